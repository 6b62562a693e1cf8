"""What the trainer, checkpoints, the kNN monitor and export ask of a self-supervised method.

A method owns what differs between methods: its branches and loss, which encoder is evaluated
and exported, what a checkpoint holds, what it adds to the run's metadata and what it logs.
The framework reads these declarations and never names a branch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn


class Branch(nn.Module):
    """Encoder followed by projector: ``z = projector(encoder(x))``."""

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class EmaPairs:
    """The parameters of a teacher that follows a student by EMA, paired by name (not by
    order): built once, checked for equal names and shapes."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        s, t = dict(student.named_parameters()), dict(teacher.named_parameters())
        if set(s) != set(t):
            raise RuntimeError(
                f"student/teacher parameter names differ: only in student {sorted(set(s) - set(t))}, "
                f"only in teacher {sorted(set(t) - set(s))}")
        for n in s:
            if s[n].shape != t[n].shape:
                raise RuntimeError(f"shape mismatch for {n}: {s[n].shape} vs {t[n].shape}")
        self.names = sorted(s)

    @torch.no_grad()
    def update(self, student: nn.Module, teacher: nn.Module, one_minus_m: float) -> None:
        """``t <- m * t + (1 - m) * s`` for every paired parameter (buffers untouched)."""
        s, t = dict(student.named_parameters()), dict(teacher.named_parameters())
        torch._foreach_lerp_([t[n] for n in self.names], [s[n].detach() for n in self.names],
                             float(one_minus_m))


class Method(nn.Module):
    """A self-supervised method as the framework sees it.

    A method subclasses this in ``m2_pretrain/models/<method>.py``, implements
    ``forward(v1, v2) -> {"loss": ...}``, :meth:`from_config` and :meth:`augmentation`, and is
    registered in ``METHODS`` (``m2_pretrain/models/build.py``) under the name
    ``model.method`` selects. The defaults below fit a method with one ``student`` branch and
    nothing else; a method with an EMA teacher overrides :meth:`update_teacher` and
    :meth:`checkpoint_parts`.

    Attributes:
        export_branch: the :meth:`checkpoint_parts` key whose ``encoder.*`` weights are
            evaluated (kNN monitor) and exported by default.
    """

    export_branch: ClassVar[str] = "student"

    @classmethod
    def from_config(cls, cfg, distributed: bool = False) -> "Method":
        """The model for a resolved ``Config`` (``distributed``: under torch.distributed)."""
        raise NotImplementedError

    @staticmethod
    def augmentation(data_cfg):
        """The method's two-view ``TwoViewTransform`` for ``cfg.data``."""
        raise NotImplementedError

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        """The modules a checkpoint saves, by key; the model's own buffers (``recurse=False``)
        are saved besides them."""
        return {"student": self.student}

    def evaluated_encoder(self) -> nn.Module:
        """The encoder the kNN monitor evaluates: the one export writes by default."""
        return self.checkpoint_parts()[self.export_branch].encoder

    def update_teacher(self, one_minus_m: float) -> None:
        """The EMA step after each optimizer step (nothing for a method without a teacher)."""

    def set_alpha(self, alpha: float | torch.Tensor) -> None:
        """Set the scheduled Momentum BN alpha (methods without that schedule ignore it)."""

    def metadata(self) -> dict:
        """What this method adds to the checkpoint metadata and the export header (besides
        the method's name, the architecture and the normalisation the framework writes)."""
        return {}

    def log_scalars(self, one_minus_m: float, alpha: float) -> dict[str, float]:
        """Scalars of the step's schedules this method uses, for the history row, TensorBoard
        and the progress bar (the EMA ``m``, Momentum BN ``alpha``)."""
        return {}

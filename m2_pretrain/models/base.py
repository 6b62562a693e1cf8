"""What the trainer, checkpoints and export rely on in a self-supervised method."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn


class TeacherStudent(nn.Module):
    """A student trained by gradient and a teacher that follows it by EMA.

    A method subclasses this, sets ``student`` and ``teacher`` (``Branch`` modules whose
    ``encoder`` is the timm network), and implements ``forward(v1, v2) -> {"loss": ...}``,
    :meth:`from_config` and :meth:`augmentation`; it is then registered in
    ``m2_pretrain.models.METHODS`` under the name ``model.method`` selects. The trainer never
    asks which method it runs.

    Attributes:
        export_branch: the branch ``m2-pretrain export`` writes by default.
    """

    export_branch: ClassVar[str] = "teacher"
    student: nn.Module
    teacher: nn.Module

    @classmethod
    def from_config(cls, cfg, distributed: bool = False) -> "TeacherStudent":
        """The model for a resolved ``Config`` (``distributed``: under torch.distributed)."""
        raise NotImplementedError

    @staticmethod
    def augmentation(data_cfg):
        """The method's two-view ``TwoViewTransform`` for ``cfg.data``."""
        raise NotImplementedError

    def update_teacher(self, one_minus_m: float) -> None:
        """The EMA step ``teacher <- m * teacher + (1 - m) * student``."""
        raise NotImplementedError

    def set_alpha(self, alpha: float | torch.Tensor) -> None:
        """Set the scheduled Momentum BN alpha (methods without that schedule ignore it)."""

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        """The modules a checkpoint saves, by key; the model's own buffers (``recurse=False``)
        are saved besides them."""
        return {"student": self.student, "teacher": self.teacher}

"""The Momentum² Teacher: a BYOL student/teacher whose teacher uses Momentum BN."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
import torch.nn as nn

from ..layers import STUDENT_NORMS, TEACHER_NORMS, apply_norm, set_momentum_bn_alpha
from ..config import bn_groups, choose, encoder_kwargs
from ..data.augment import TwoViewTransform
from .base import Branch, EmaPairs, Method
from .encoder import create_encoder
from .heads import MLP
from .loss import symmetric_byol_loss


class M2Teacher(Method):
    """Student (encoder + projector + predictor) and teacher (EMA encoder + projector).

    Args:
        arch: timm architecture of the encoder.
        proj_hidden, proj_out: projector widths (encoder width -> proj_hidden -> proj_out).
        pred_hidden: predictor width (proj_out -> pred_hidden -> proj_out).
        teacher_norm: ``"momentum"`` (Momentum BN, fed both views as one batch and reducing
            statistics per view and group), ``"bn"`` (plain train-mode BN on each view
            separately, per group: the BYOL baseline of Table 1) or ``"sync"`` (BN over each
            view's whole batch; SyncBatchNorm across processes).
        alpha_base: initial Momentum BN alpha.
        encoder_kwargs: passed to ``timm.create_model``.
        student_norm: ``"bn"`` (per device, i.e. per group) or ``"sync"`` (whole batch) for the
            student's encoder, projector and predictor.
        bn_groups: virtual devices per view batch ("per device" BN statistics inside one
            process; see ``m2_pretrain.layers.norms``). 1 = the process is one device.
        distributed: running under torch.distributed (``sync`` becomes ``SyncBatchNorm``).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        proj_hidden: int = 512,
        proj_out: int = 128,
        pred_hidden: int = 512,
        teacher_norm: str = "momentum",
        alpha_base: float = 1.0,
        encoder_kwargs: dict | None = None,
        student_norm: str = "bn",
        bn_groups: int = 1,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        if teacher_norm not in TEACHER_NORMS:
            raise ValueError(f"teacher_norm must be one of {TEACHER_NORMS}, got {teacher_norm!r}")
        if student_norm not in STUDENT_NORMS:
            raise ValueError(f"student_norm must be one of {STUDENT_NORMS}, got {student_norm!r}")
        if bn_groups < 1:
            raise ValueError(f"bn_groups must be >= 1, got {bn_groups}")
        self.arch = arch
        self.teacher_norm, self.student_norm, self.bn_groups = teacher_norm, student_norm, bn_groups
        encoder = create_encoder(arch, **(encoder_kwargs or {}))
        dim = encoder.num_features
        self.student = Branch(encoder, MLP(dim, proj_hidden, proj_out))
        self.predictor = MLP(proj_out, pred_hidden, proj_out)
        self.teacher = copy.deepcopy(self.student)
        for part in (self.student, self.predictor):
            apply_norm(part, student_norm, num_groups=bn_groups, distributed=distributed)
        apply_norm(self.teacher, teacher_norm, num_groups=bn_groups, num_views=2,
                   alpha=alpha_base, distributed=distributed)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._ema = EmaPairs(self.student, self.teacher)

    export_branch: ClassVar[str] = "teacher"  # as the paper transfers

    @classmethod
    def from_config(cls, cfg, distributed: bool = False) -> "M2Teacher":
        m = cfg.model
        choose("model.teacher_norm", m.teacher_norm, dict.fromkeys(TEACHER_NORMS))
        choose("model.student_norm", m.student_norm, dict.fromkeys(STUDENT_NORMS))
        return cls(m.arch, m.proj_hidden, m.proj_out, m.pred_hidden, m.teacher_norm, m.alpha_base,
                   student_norm=m.student_norm, bn_groups=bn_groups(cfg), distributed=distributed,
                   encoder_kwargs=encoder_kwargs(cfg))

    @staticmethod
    def augmentation(data_cfg) -> TwoViewTransform:
        """The authors' asymmetric pipeline (BYOL's: blur 1.0 / 0.1, solarisation on the
        teacher's view only)."""
        d = data_cfg
        return TwoViewTransform(d.res, d.crop_scale_min, blur_sigma=tuple(d.blur_sigma),
                                teacher_solarize_p=d.solarize_p)

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, "predictor": self.predictor}

    def metadata(self) -> dict:
        return {"teacher_norm": self.teacher_norm, "student_norm": self.student_norm}

    def log_scalars(self, one_minus_m: float, alpha: float) -> dict[str, float]:
        return {"m": 1 - one_minus_m, "alpha": alpha}

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_teacher(self, one_minus_m: float) -> None:
        """``xi <- m * xi + (1 - m) * theta`` for every parameter, paired by name.

        Teacher BN buffers (Momentum BN running statistics, alpha) are not touched.
        """
        self._ema.update(self.student, self.teacher, one_minus_m)

    def set_alpha(self, alpha: float | torch.Tensor) -> None:
        """Set the Momentum BN current-batch weight of the teacher (no-op for ``bn``)."""
        set_momentum_bn_alpha(self.teacher, alpha)

    # -------------------------------------------------------------- forward
    @torch.no_grad()
    def teacher_targets(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher projections of both views (no gradient)."""
        if self.teacher_norm == "momentum":
            # [view][group][sample]: Momentum BN reduces per view and group
            z = self.teacher(torch.cat([v1, v2], dim=0))
            return z[: v1.shape[0]], z[v1.shape[0] :]
        return self.teacher(v1), self.teacher(v2)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetrised BYOL loss of the student against the teacher.

        The student runs each view separately so its BN statistics stay per view. With
        ``bn_groups > 1`` each view's batch is ``bn_groups`` devices' batches, in order; the loss
        is the mean over the whole batch, as DDP's averaged gradient is.

        Returns:
            ``{"loss": scalar}``.
        """
        if v1.shape != v2.shape:
            raise ValueError(f"views must have equal shapes, got {tuple(v1.shape)} and {tuple(v2.shape)}")
        p1 = self.predictor(self.student(v1))
        p2 = self.predictor(self.student(v2))
        z1, z2 = self.teacher_targets(v1, v2)
        return {"loss": symmetric_byol_loss(p1, p2, z1, z2)}

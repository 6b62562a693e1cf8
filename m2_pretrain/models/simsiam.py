"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021).

One encoder with a 3-layer projector, a predictor, and a stop-gradient: no EMA teacher, no
negatives. The loss is the symmetrised negative cosine similarity
``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``. The paper compares Momentum² Teacher with it
(its Table 5).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import choose, encoder_kwargs
from ..data.augment import TwoViewTransform
from ..layers import STUDENT_NORMS, apply_norm
from .base import Branch, Method
from .encoder import create_encoder
from .heads import MLP
from .mocov2 import MoCoV2


class SimSiam(Method):
    """SimSiam.

    Args:
        arch: timm architecture of the encoder.
        dim: projector width and output (2048 in the paper).
        pred_hidden: predictor bottleneck (512).
        student_norm: ``"bn"`` (per device) or ``"sync"`` (whole batch).
        encoder_kwargs: passed to ``timm.create_model``.
        distributed: running under torch.distributed (``sync`` becomes ``SyncBatchNorm``).
    """

    def __init__(self, arch: str = "resnet50", dim: int = 2048, pred_hidden: int = 512,
                 student_norm: str = "bn", encoder_kwargs: dict | None = None,
                 distributed: bool = False) -> None:
        super().__init__()
        if student_norm not in STUDENT_NORMS:
            raise ValueError(f"student_norm must be one of {STUDENT_NORMS}, got {student_norm!r}")
        self.arch, self.student_norm = arch, student_norm
        encoder = create_encoder(arch, **(encoder_kwargs or {}))
        projector = nn.Sequential(MLP(encoder.num_features, dim, dim, num_layers=3),
                                  nn.BatchNorm1d(dim, affine=False))
        self.student = Branch(encoder, projector)
        self.predictor = MLP(dim, pred_hidden, dim)
        for part in (self.student, self.predictor):
            apply_norm(part, student_norm, distributed=distributed)

    @classmethod
    def from_config(cls, cfg, distributed: bool = False) -> "SimSiam":
        m = cfg.model
        choose("model.student_norm", m.student_norm, dict.fromkeys(STUDENT_NORMS))
        return cls(m.arch, m.simsiam.dim, m.simsiam.pred_hidden, m.student_norm,
                   encoder_kwargs=encoder_kwargs(cfg), distributed=distributed)

    @staticmethod
    def augmentation(data_cfg) -> TwoViewTransform:
        """The paper's symmetric pipeline, MoCo v2's."""
        return MoCoV2.augmentation(data_cfg)

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        return {"student": self.student, "predictor": self.predictor}

    def metadata(self) -> dict:
        return {"student_norm": self.student_norm}

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetrised negative cosine of each view's prediction against the other view's
        projection, which receives no gradient.

        Returns:
            ``{"loss": scalar in [-1, 1]}``.
        """
        z1, z2 = self.student(v1), self.student(v2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        cos = (F.cosine_similarity(p1.float(), z2.detach().float(), dim=-1).mean()
               + F.cosine_similarity(p2.float(), z1.detach().float(), dim=-1).mean())
        return {"loss": -cos / 2}

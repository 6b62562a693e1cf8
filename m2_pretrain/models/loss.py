"""BYOL's normalised L2 loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, z)`` averaged over the batch, computed in fp32; ``z`` is not differentiated."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return (2.0 - 2.0 * (p * z).sum(dim=-1)).mean()


def symmetric_byol_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """``L(q(v), t(v')) + L(q(v'), t(v))`` with student predictions p and teacher targets z."""
    return byol_loss(p1, z2) + byol_loss(p2, z1)

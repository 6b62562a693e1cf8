"""Normalisation layers (torch only)."""

from .convert import convert_momentum_bn, count_plain_bn
from .grouped_bn import GroupedBatchNorm, GroupedBatchNormAct2d, convert_grouped_bn
from .momentum_bn import (
    MomentumBatchNorm,
    MomentumBatchNormAct2d,
    momentum_bn_modules,
    set_momentum_bn_alpha,
)
from .norms import KEY_NORMS, STUDENT_NORMS, TEACHER_NORMS, apply_norm

__all__ = [
    "GroupedBatchNorm",
    "GroupedBatchNormAct2d",
    "KEY_NORMS",
    "MomentumBatchNorm",
    "MomentumBatchNormAct2d",
    "STUDENT_NORMS",
    "TEACHER_NORMS",
    "apply_norm",
    "convert_grouped_bn",
    "convert_momentum_bn",
    "count_plain_bn",
    "momentum_bn_modules",
    "set_momentum_bn_alpha",
]

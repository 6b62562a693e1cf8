"""Normalisation layers (torch only)."""

from .convert import copy_bn_state, count_plain_bn, replace_batch_norm
from .grouped_bn import GroupedBatchNorm, GroupedBatchNormAct2d, convert_grouped_bn
from .memory import memory_format_of
from .momentum_bn import (
    MomentumBatchNorm,
    MomentumBatchNormAct2d,
    convert_momentum_bn,
    momentum_bn_modules,
    set_momentum_bn_alpha,
)
from .norms import (
    KEY_NORMS,
    NORMS,
    STUDENT_NORMS,
    TEACHER_NORMS,
    KeyNorm,
    Norm,
    StudentNorm,
    TeacherNorm,
    apply_norm,
)

__all__ = [
    "GroupedBatchNorm",
    "GroupedBatchNormAct2d",
    "KEY_NORMS",
    "KeyNorm",
    "MomentumBatchNorm",
    "MomentumBatchNormAct2d",
    "NORMS",
    "Norm",
    "STUDENT_NORMS",
    "StudentNorm",
    "TEACHER_NORMS",
    "TeacherNorm",
    "apply_norm",
    "convert_grouped_bn",
    "convert_momentum_bn",
    "copy_bn_state",
    "count_plain_bn",
    "memory_format_of",
    "momentum_bn_modules",
    "replace_batch_norm",
    "set_momentum_bn_alpha",
]

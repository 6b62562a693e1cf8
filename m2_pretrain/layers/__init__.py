"""Normalisation layers (torch only)."""

from .convert import convert_momentum_bn, count_plain_bn
from .momentum_bn import (
    MomentumBatchNorm,
    MomentumBatchNormAct2d,
    momentum_bn_modules,
    set_momentum_bn_alpha,
)

__all__ = [
    "MomentumBatchNorm",
    "MomentumBatchNormAct2d",
    "convert_momentum_bn",
    "count_plain_bn",
    "momentum_bn_modules",
    "set_momentum_bn_alpha",
]

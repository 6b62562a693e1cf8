"""Normalisations chosen by name, in one place: config validation, M2 and MoCo take the names
and their ``Literal`` types from here.

Names (the rows of the paper's Table 1; "device" may be a virtual one, see ``GroupedBatchNorm``):

* ``bn`` — plain BN per device: with ``num_groups > 1`` each group of the batch is normalised
  with its own statistics (``GroupedBatchNorm``).
* ``sync`` — BN over the whole global batch: in one process plain BN over the whole batch of
  each call; across processes torch's ``SyncBatchNorm`` (CUDA only).
* ``momentum`` — Momentum BN per device, one set of running statistics per group.
* ``shuffle_bn`` — MoCo's shuffling BN (the MoCo key encoder only; ``MoCoV2`` implements it,
  not :func:`apply_norm`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch.nn as nn

from .grouped_bn import convert_grouped_bn
from .momentum_bn import convert_momentum_bn

StudentNorm = Literal["bn", "sync"]
Norm = Literal[StudentNorm, "momentum"]  # every name apply_norm accepts; a teacher takes any
TeacherNorm = Norm
KeyNorm = Literal["shuffle_bn", "momentum", "bn"]  # shuffle_bn: MoCo's key encoder only

NORMS: tuple[str, ...] = get_args(Norm)
STUDENT_NORMS: tuple[str, ...] = get_args(StudentNorm)
TEACHER_NORMS: tuple[str, ...] = NORMS
KEY_NORMS: tuple[str, ...] = get_args(KeyNorm)


def apply_norm(module: nn.Module, name: str, num_groups: int = 1, num_views: int = 1,
               alpha: float = 1.0, distributed: bool = False) -> nn.Module:
    """Convert every plain batch norm in ``module`` to the normalisation ``name``.

    Args:
        module: a module with plain BN layers (e.g. a timm CNN and its heads).
        name: one of :data:`NORMS`.
        num_groups: virtual devices per call (``bn``, ``momentum``).
        num_views: views stacked along the batch in one call (``momentum``).
        alpha: Momentum BN's initial current-batch weight.
        distributed: running under torch.distributed (``sync`` becomes ``SyncBatchNorm``).

    Returns:
        The converted module (a new object only when ``module`` itself is a batch norm).
    """
    if name == "bn":
        return convert_grouped_bn(module, num_groups)
    if name == "sync":
        if not distributed:
            return module  # one process: plain BN already normalises the whole batch of a call
        from timm.layers import convert_sync_batchnorm  # handles BatchNormAct2d too

        return convert_sync_batchnorm(module)
    if name == "momentum":
        return convert_momentum_bn(module, num_views=num_views, alpha=alpha,
                                   num_groups=num_groups)
    raise ValueError(f"unknown norm {name!r}: choose one of {NORMS}")

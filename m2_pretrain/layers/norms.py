"""Normalisations chosen by name, in one place (config validation, M2, MoCo use this table).

Names (the rows of the paper's Table 1; "device" may be a virtual one, see ``GroupedBatchNorm``):

* ``bn`` — plain BN per device: with ``num_groups > 1`` each group of the batch is normalised
  with its own statistics (``GroupedBatchNorm``).
* ``sync`` — BN over the whole global batch: in one process plain BN over the whole batch of
  each call; across processes torch's ``SyncBatchNorm`` (CUDA only).
* ``momentum`` — Momentum BN per device, one set of running statistics per group.
* ``shuffle_bn`` — MoCo's shuffling BN (the MoCo key encoder only; ``MoCoV2`` implements it).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .convert import convert_momentum_bn
from .grouped_bn import convert_grouped_bn

STUDENT_NORMS = ("bn", "sync")
TEACHER_NORMS = ("bn", "sync", "momentum")
KEY_NORMS = ("shuffle_bn", "momentum", "bn")


def _sync(module: nn.Module, num_groups: int, num_views: int, alpha: float,
          distributed: bool) -> nn.Module:
    if not distributed:
        return module  # one process: plain BN already normalises the whole batch of a call
    from timm.layers import convert_sync_batchnorm  # handles BatchNormAct2d too

    return convert_sync_batchnorm(module)


_CONVERTERS: dict[str, Callable[..., nn.Module]] = {
    "bn": lambda m, num_groups, num_views, alpha, distributed: convert_grouped_bn(m, num_groups),
    "sync": _sync,
    "momentum": lambda m, num_groups, num_views, alpha, distributed: convert_momentum_bn(
        m, num_views=num_views, alpha=alpha, num_groups=num_groups),
}


def apply_norm(module: nn.Module, name: str, num_groups: int = 1, num_views: int = 1,
               alpha: float = 1.0, distributed: bool = False) -> nn.Module:
    """Convert every plain batch norm in ``module`` to the normalisation ``name``.

    Args:
        module: a module with plain BN layers (e.g. a timm CNN and its heads).
        name: ``bn``, ``sync`` or ``momentum``.
        num_groups: virtual devices per call (``bn``, ``momentum``).
        num_views: views stacked along the batch in one call (``momentum``).
        alpha: Momentum BN's initial current-batch weight.
        distributed: running under torch.distributed (``sync`` becomes ``SyncBatchNorm``).

    Returns:
        The converted module (a new object only when ``module`` itself is a batch norm).
    """
    if name not in _CONVERTERS:
        raise ValueError(f"unknown norm {name!r}: choose one of {sorted(_CONVERTERS)}")
    return _CONVERTERS[name](module, num_groups, num_views, alpha, distributed)

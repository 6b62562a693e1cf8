"""Recursive BatchNorm -> Momentum BN conversion, in the style of timm's
``convert_sync_batchnorm`` and Detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .momentum_bn import MomentumBatchNorm, MomentumBatchNormAct2d


def _copy_bn_state(src: _BatchNorm, dst: nn.Module) -> None:
    """Copy affine parameters and running statistics (broadcast to per-group rows) into a
    converted norm layer."""
    with torch.no_grad():
        if src.affine:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        if src.track_running_stats and src.running_mean is not None:
            # one group's (C,) statistics start every group's row; equal shapes copy as is
            dst.running_mean.copy_(src.running_mean.expand_as(dst.running_mean))
            dst.running_var.copy_(src.running_var.expand_as(dst.running_var))


def convert_momentum_bn(
    module: nn.Module, num_views: int = 1, alpha: float = 1.0, num_groups: int = 1
) -> nn.Module:
    """Replace every batch norm in ``module`` by Momentum BN, in place where possible.

    Handles ``nn.BatchNorm1d/2d``, ``nn.SyncBatchNorm`` and timm's ``BatchNormAct2d`` /
    ``SyncBatchNormAct`` (their dropout and activation are kept). Affine parameters and
    running statistics are copied; the result is on the same device and dtype.

    Args:
        module: any module, e.g. a timm CNN.
        num_views: views stacked along the batch dimension in each forward (2 for a teacher
            that forwards ``[v'; v]`` as one batch).
        alpha: initial weight of the current batch.
        num_groups: virtual devices per view, each with its own running statistics.

    Returns:
        The converted module (a new object only when ``module`` itself is a batch norm).
    """
    if isinstance(module, MomentumBatchNorm):
        return module
    if isinstance(module, _BatchNorm):
        kwargs = dict(
            num_features=module.num_features,
            eps=module.eps,
            affine=module.affine,
            num_views=num_views,
            alpha=alpha,
            num_groups=num_groups,
        )
        if hasattr(module, "act") and hasattr(module, "drop"):  # timm BatchNormAct2d family
            new = MomentumBatchNormAct2d(**kwargs, drop=module.drop, act=module.act)
        else:
            new = MomentumBatchNorm(**kwargs)
        ref = module.weight if module.affine else module.running_mean
        if ref is not None:
            new = new.to(device=ref.device)
        _copy_bn_state(module, new)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_momentum_bn(child, num_views=num_views, alpha=alpha,
                                        num_groups=num_groups)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def count_plain_bn(module: nn.Module) -> int:
    """Number of batch-norm layers in ``module`` that are not Momentum BN."""
    return sum(
        isinstance(m, _BatchNorm) and not isinstance(m, MomentumBatchNorm) for m in module.modules()
    )

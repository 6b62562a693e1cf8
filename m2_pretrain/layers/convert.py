"""The one recursive batch-norm replacement behind every conversion, in the style of timm's
``convert_sync_batchnorm`` and Detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

# builds the replacement of one batch norm, or None to keep it
Replacer = Callable[[_BatchNorm], Optional[nn.Module]]


def replace_batch_norm(module: nn.Module, replace: Replacer) -> nn.Module:
    """Replace every batch norm in ``module`` (the module itself included) by ``replace(bn)``.

    A batch norm for which ``replace`` returns None is kept; its children are not visited (a
    batch norm has none that are batch norms). The replacement is moved to the batch norm's
    device, gets its training mode, and its affine parameters and running statistics (see
    :func:`copy_bn_state`).

    Args:
        module: any module, e.g. a timm CNN.
        replace: builds the new, empty layer for one batch norm.

    Returns:
        The converted module (a new object only when ``module`` itself is replaced).
    """
    if isinstance(module, _BatchNorm):
        new = replace(module)
        if new is None:
            return module
        ref = module.weight if module.affine else module.running_mean
        if ref is not None:
            new = new.to(device=ref.device)
        copy_bn_state(module, new)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = replace_batch_norm(child, replace)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def copy_bn_state(src: _BatchNorm, dst: nn.Module) -> None:
    """Copy affine parameters and running statistics from ``src`` into a converted norm layer;
    one (C,) set of statistics starts every row of (G, C) buffers."""
    with torch.no_grad():
        if src.affine:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        if src.track_running_stats and src.running_mean is not None:
            dst.running_mean.copy_(src.running_mean.expand_as(dst.running_mean))
            dst.running_var.copy_(src.running_var.expand_as(dst.running_var))


def is_bn_act(bn: nn.Module) -> bool:
    """Whether ``bn`` is one of timm's ``BatchNormAct2d`` family (dropout and activation)."""
    return hasattr(bn, "act") and hasattr(bn, "drop")


def count_plain_bn(module: nn.Module) -> int:
    """Number of ``torch.nn`` batch-norm layers (and subclasses, e.g. timm's) in ``module``;
    Momentum BN is not one."""
    return sum(isinstance(m, _BatchNorm) for m in module.modules())

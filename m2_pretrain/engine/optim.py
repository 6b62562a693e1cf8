"""The optimizer: SGD or LARS over two parameter groups (weight decay on weights only)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..config import Config, choose


def param_groups(modules: list[nn.Module], weight_decay: float, exclude_bias_norm: bool) -> list[dict]:
    """Two groups: weights with weight decay; biases and norm parameters (ndim <= 1) without.

    With LARS, a group whose weight decay is 0 is also excluded from the trust-ratio adaptation
    (timm's ``Lars`` adapts only where weight decay is set, unless ``always_adapt``).
    """
    decay, no_decay = [], []
    for m in modules:
        for _, p in m.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if exclude_bias_norm and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _lars(groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    from timm.optim import Lars

    return Lars(groups, lr=lr, momentum=momentum)


# ``optim.name`` -> ``(param_groups, lr, momentum) -> optimizer``
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda groups, lr, momentum: torch.optim.SGD(groups, lr=lr, momentum=momentum),
    "lars": _lars,
}


def build_optimizer(cfg: Config, modules: list[nn.Module], lr: float) -> torch.optim.Optimizer:
    """``optim.name`` over :func:`param_groups` of ``modules``; ``ConfigError`` for an unknown
    name (raised before the model is touched)."""
    make = choose("optim.name", cfg.optim.name, OPTIMIZERS)
    groups = param_groups(modules, cfg.optim.weight_decay, cfg.optim.exclude_bias_norm)
    return make(groups, lr, cfg.optim.momentum)

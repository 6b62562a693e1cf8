"""A deliberately plain Momentum BN in the style of the authors' code, for benchmarks and tests.

Each view is a separate call; the mean and the (biased) variance are separate passes; the
statistics waiting for the lazy update and alpha live in Python attributes; ``commit()`` applies
the lazy update after all views of an iteration. Same semantics as ``MomentumBatchNorm`` (it
keeps the fixes listed in docs/method.md: biased variance, no double Bessel correction),
slower by design. Not for training: its Python-side state does not go into ``state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class ReferenceMomentumBN(nn.Module):
    def __init__(self, bn: _BatchNorm, alpha: float = 1.0) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight = nn.Parameter(bn.weight.detach().clone(),
                                   requires_grad=bn.weight.requires_grad)
        self.bias = nn.Parameter(bn.bias.detach().clone(), requires_grad=bn.bias.requires_grad)
        self.register_buffer("running_mean", bn.running_mean.detach().clone().float())
        self.register_buffer("running_var", bn.running_var.detach().clone().float())
        self.act = getattr(bn, "act", nn.Identity())
        self.drop = getattr(bn, "drop", nn.Identity())
        self.alpha = float(alpha)  # Python-side state, as in the authors' code
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        mean = xf.mean(dim=dims)
        var = ((xf - mean.view(shape)) ** 2).mean(dim=dims)
        self.pending.append((mean.detach(), var.detach()))
        a = self.alpha
        m = a * mean + (1 - a) * self.running_mean
        v = a * var + (1 - a) * self.running_var
        y = (xf - m.view(shape)) / torch.sqrt(v.view(shape) + self.eps)
        y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return self.act(self.drop(y.to(x.dtype)))

    @torch.no_grad()
    def commit(self) -> None:
        """Lazy update with the mean of the pending views' statistics."""
        if not self.pending:
            return
        mean = torch.stack([p[0] for p in self.pending]).mean(0)
        var = torch.stack([p[1] for p in self.pending]).mean(0)
        a = self.alpha
        self.running_mean.mul_(1 - a).add_(a * mean)
        self.running_var.mul_(1 - a).add_(a * var)
        self.pending.clear()


def convert_reference_momentum_bn(module: nn.Module, alpha: float = 1.0) -> nn.Module:
    """Replace every BN (incl. timm's BatchNormAct2d) with ``ReferenceMomentumBN``."""
    if isinstance(module, _BatchNorm):
        return ReferenceMomentumBN(module, alpha)
    for name, child in module.named_children():
        new = convert_reference_momentum_bn(child, alpha)
        if new is not child:
            setattr(module, name, new)
    return module


def reference_layers(module: nn.Module) -> list[ReferenceMomentumBN]:
    return [m for m in module.modules() if isinstance(m, ReferenceMomentumBN)]

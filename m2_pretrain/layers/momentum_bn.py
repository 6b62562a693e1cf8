"""Momentum BN: batch normalisation whose statistics are a momentum mix of the current
batch's and the running ones (Momentum² Teacher, Li et al. 2021, Sec. 3.2).

Semantics (the authors' behaviour without two of its defects, see docs/method.md):

* ``alpha`` is the weight of the *current batch*; the trainer sets it from a schedule
  (``m2_pretrain.models.schedules.momentum_bn_alpha``). The layer never advances it.
* The input batch holds ``num_views`` views stacked along dim 0, ``[v_1; v_2; ...]``. Each
  view ``v`` is normalised with ``mu = alpha * mu_v + (1 - alpha) * mu_run`` and
  ``var = alpha * var_v + (1 - alpha) * var_run`` where ``mu_v``/``var_v`` are that view's
  own batch statistics (biased variance, Eq. 1). No view sees another view's statistics.
* Lazy update, once per forward (i.e. once per iteration, after all views):
  ``run <- alpha * mean_v(stat_v) + (1 - alpha) * run``.
* Statistics are computed in fp32 whatever the input dtype (autocast); all state
  (running stats, alpha, update counter) lives in buffers, so ``state_dict`` round-trips.
* In eval mode the layer normalises with the running statistics only, like ``nn.BatchNorm``.
* Virtual devices (``num_groups = G > 1``): each view's batch holds ``G`` equal groups, laid
  out view-major then group-major (``[view][group][sample]``); each (view, group) is
  normalised with its own statistics mixed with its group's running statistics, and each
  group's running statistics (row ``g`` of the ``(G, C)`` buffers: what device ``g`` would
  hold) are updated lazily from the mean of that group's views. Eval mode uses group 0's
  (rank 0's) statistics. With ``G == 1`` the buffers keep shape ``(C,)``.
* The training forward is ``m2_pretrain.layers.fused_bn.momentum_bn_train_fused``: in eager
  mode without gradient the fast path on native batch-norm kernels (CUDA's, or the CPU's for
  fp32 inputs), else (``torch.compile``, a gradient, fp64, bf16 on the CPU) the composite
  math, which inductor fuses with the neighbouring ops.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .convert import is_bn_act, replace_batch_norm
from .fused_bn import momentum_bn_train_fused


class MomentumBatchNorm(nn.Module):
    """Momentum BN for inputs of shape (B, C) or (B, C, *spatial).

    Args:
        num_features: number of channels C.
        eps: added to the variance before the square root.
        affine: learnable per-channel scale and shift (gamma, beta).
        num_views: number of views stacked along the batch dimension; B must be divisible by it.
        alpha: initial weight of the current batch's statistics.
        num_groups: virtual devices per view (``[view][group][sample]`` layout), each with its
            own running statistics; B must be divisible by ``num_views * num_groups``.

    State dict keys are those of ``nn.BatchNorm2d`` (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``) plus ``alpha``; the running statistics have
    shape ``(C,)`` for one group and ``(num_groups, C)`` otherwise.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        num_views: int = 1,
        alpha: float = 1.0,
        num_groups: int = 1,
    ) -> None:
        super().__init__()
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.num_views = num_views
        self.num_groups = num_groups
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        stat_shape = (num_features,) if num_groups == 1 else (num_groups, num_features)
        self.register_buffer("running_mean", torch.zeros(stat_shape))
        self.register_buffer("running_var", torch.ones(stat_shape))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"num_views={self.num_views}, num_groups={self.num_groups}, "
            f"alpha={float(self.alpha):.4g}"
        )

    @torch.no_grad()
    def set_alpha(self, alpha: float | torch.Tensor) -> None:
        """Set the current-batch weight in place (keeps the buffer, so no recompilation).

        A Python number is written with ``fill_`` (no host-to-device copy, no sync); a tensor
        on the buffer's device is copied on the device.
        """
        if isinstance(alpha, torch.Tensor) and alpha.device == self.alpha.device:
            self.alpha.copy_(alpha)
        else:
            self.alpha.fill_(float(alpha))

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        g, c = self.num_groups, self.num_features
        scale = torch.rsqrt(self.running_var.view(g, c)[0] + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift = -self.running_mean.view(g, c)[0] * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        shape = (1, c) + (1,) * (x.dim() - 2)
        return (x.float() * scale.view(shape) + shift.view(shape)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"MomentumBatchNorm expected input (B, {self.num_features}, ...), "
                             f"got {tuple(x.shape)}")
        if not self.training:  # group 0's statistics: what rank 0 saves
            return self._eval_forward(x)
        y = momentum_bn_train_fused(x, self.num_views, self.num_groups, self.running_mean,
                                    self.running_var, self.alpha, self.weight, self.bias,
                                    self.eps)
        self.num_batches_tracked.add_(1)
        return y


class MomentumBatchNormAct2d(MomentumBatchNorm):
    """Momentum BN followed by the dropout and activation of a timm ``BatchNormAct2d``.

    Its state dict keys are those of ``BatchNormAct2d`` plus ``alpha``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        num_views: int = 1,
        alpha: float = 1.0,
        drop: Optional[nn.Module] = None,
        act: Optional[nn.Module] = None,
        num_groups: int = 1,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, num_views=num_views, alpha=alpha,
                         num_groups=num_groups)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def convert_momentum_bn(
    module: nn.Module, num_views: int = 1, alpha: float = 1.0, num_groups: int = 1
) -> nn.Module:
    """Replace every batch norm in ``module`` by Momentum BN, in place where possible.

    Handles ``nn.BatchNorm1d/2d``, ``nn.SyncBatchNorm`` and timm's ``BatchNormAct2d`` /
    ``SyncBatchNormAct`` (their dropout and activation are kept). Affine parameters and
    running statistics are copied; the result is on the same device.

    Args:
        module: any module, e.g. a timm CNN.
        num_views: views stacked along the batch dimension in each forward (2 for a teacher
            that forwards ``[v'; v]`` as one batch).
        alpha: initial weight of the current batch.
        num_groups: virtual devices per view, each with its own running statistics.

    Returns:
        The converted module (a new object only when ``module`` itself is a batch norm).
    """

    def momentum(bn: _BatchNorm) -> MomentumBatchNorm:
        kwargs = dict(num_features=bn.num_features, eps=bn.eps, affine=bn.affine,
                      num_views=num_views, alpha=alpha, num_groups=num_groups)
        if is_bn_act(bn):
            return MomentumBatchNormAct2d(**kwargs, drop=bn.drop, act=bn.act)
        return MomentumBatchNorm(**kwargs)

    return replace_batch_norm(module, momentum)


def momentum_bn_modules(module: nn.Module) -> list[MomentumBatchNorm]:
    """All Momentum BN layers inside ``module``."""
    return [m for m in module.modules() if isinstance(m, MomentumBatchNorm)]


@torch.no_grad()
def set_momentum_bn_alpha(module: nn.Module, alpha: float | torch.Tensor) -> int:
    """Set alpha in every Momentum BN layer of ``module``.

    Returns:
        The number of layers updated.
    """
    layers = momentum_bn_modules(module)
    for m in layers:
        m.set_alpha(alpha)
    return len(layers)

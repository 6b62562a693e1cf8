"""Per-group batch norm: one process normalising as several devices would ("virtual devices").

The batch of each call is split along dim 0 into ``num_groups`` equal, contiguous groups;
each group is normalised with its own batch statistics and updates its own running
statistics, exactly as ``num_groups`` devices running plain per-device BN (no SyncBN) on
those groups would. With ``num_groups == 1`` the layer is ``nn.BatchNorm``.

State-dict keys are those of ``nn.BatchNorm2d``. With ``num_groups > 1`` the running
statistics have shape ``(num_groups, C)``: row ``g`` is what device ``g`` would hold. In
eval mode the layer normalises with group 0's statistics (what rank 0 saves in a real
multi-GPU run), and that row is what ``m2-pretrain export`` writes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .convert import is_bn_act, replace_batch_norm


class GroupedBatchNorm(_BatchNorm):
    """BatchNorm over inputs (B, C) or (B, C, *spatial) whose batch is ``num_groups`` devices'.

    Args:
        num_features: channels C.
        num_groups: groups (virtual devices) per call; B must be divisible by it.
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 1,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.num_groups = num_groups
        if track_running_stats and num_groups > 1:
            self.running_mean = torch.zeros(num_groups, num_features)
            self.running_var = torch.ones(num_groups, num_features)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input (B, C, ...), got {x.dim()}D")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"

    def _row(self, buf: Optional[torch.Tensor], g: int) -> Optional[torch.Tensor]:
        return buf if buf is None or buf.dim() == 1 else buf[g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"GroupedBatchNorm expected input (B, {self.num_features}, ...), "
                f"got {tuple(x.shape)}"
            )
        use_batch = self.training or not self.track_running_stats
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
        if not use_batch or self.num_groups == 1:
            # eval mode: group 0's statistics (rank 0's); one group: plain BN
            return F.batch_norm(x, self._row(self.running_mean, 0), self._row(self.running_var, 0),
                                self.weight, self.bias, use_batch, factor, self.eps)
        g = self.num_groups
        if x.shape[0] % g != 0:
            raise ValueError(
                f"batch of {x.shape[0]} is not divisible into {g} BN groups "
                f"(train.batch_size must be a multiple of train.bn_group_size)"
            )
        # Contiguous slices along dim 0 (no copy, channels_last kept); each is one device's
        # plain BN with that device's running statistics (rows of the (G, C) buffers, updated
        # in place by the native kernel).
        outs = [
            F.batch_norm(chunk, self._row(self.running_mean, i), self._row(self.running_var, i),
                         self.weight, self.bias, True, factor, self.eps)
            for i, chunk in enumerate(x.chunk(g))
        ]
        return torch.cat(outs)


class GroupedBatchNormAct2d(GroupedBatchNorm):
    """``GroupedBatchNorm`` followed by the dropout and activation of a timm ``BatchNormAct2d``
    (same state-dict keys)."""

    def __init__(
        self,
        num_features: int,
        num_groups: int = 1,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        drop: Optional[nn.Module] = None,
        act: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(num_features, num_groups, eps, momentum, affine, track_running_stats)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def convert_grouped_bn(module: nn.Module, num_groups: int) -> nn.Module:
    """Replace every plain batch norm in ``module`` by ``GroupedBatchNorm(num_groups)``.

    Handles ``nn.BatchNorm1d/2d/3d`` and timm's ``BatchNormAct2d`` (dropout and activation
    kept); ``SyncBatchNorm`` and already grouped layers are left alone. Affine parameters and
    the update counter are copied and every group's running statistics start from the
    layer's. ``num_groups == 1`` is a no-op.

    Returns:
        The converted module (a new object only when ``module`` itself is a batch norm).
    """
    if num_groups == 1:
        return module

    def grouped(bn: _BatchNorm) -> Optional[GroupedBatchNorm]:
        if isinstance(bn, (GroupedBatchNorm, nn.SyncBatchNorm)):
            return None
        kwargs = dict(num_features=bn.num_features, num_groups=num_groups, eps=bn.eps,
                      momentum=bn.momentum, affine=bn.affine,
                      track_running_stats=bn.track_running_stats)
        if is_bn_act(bn):
            new = GroupedBatchNormAct2d(**kwargs, drop=bn.drop, act=bn.act)
        else:
            new = GroupedBatchNorm(**kwargs)
        if bn.track_running_stats and bn.running_mean is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
        return new

    return replace_batch_norm(module, grouped)

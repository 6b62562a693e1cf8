"""Momentum BN training forward at plain-BN cost on CUDA.

Built on the two kernels ``SyncBatchNorm`` uses: ``torch.batch_norm_stats`` (fp32 mean and
inverse std of a low-precision, contiguous or channels_last batch in one pass) and
``torch.batch_norm_elemt`` (one normalising pass that writes the input dtype). Per
(view, group) slice of the batch: one statistics pass, one normalising pass; the momentum mix
and the lazy running-statistics update are small (V, G, C) fp32 tensor ops. No fp32 copy of
the activation is made, alpha stays a tensor (no host sync; under ``torch.compile`` a new
alpha value is a new input value, not a new graph).

The kernels are injected (``stats_fn``/``elemt_fn``), so the whole function also runs on CPU
with the stand-ins below: that is how the shared math is tested without a GPU.

Semantics (docs/method.md, "Momentum BN"): the batch is ``[view][group][sample]``; each slice is
normalised with ``alpha * batch + (1 - alpha) * running`` statistics of its group (biased
variance), then the group's running statistics take ``alpha`` of the mean over views of its
batch statistics.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Tensor = torch.Tensor
StatsFn = Callable[[Tensor, float], tuple[Tensor, Tensor]]
ElemtFn = Callable[..., Tensor]


# ----------------------------------------------------------------------------- CPU stand-ins
def batch_norm_stats_cpu(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """CPU stand-in of ``torch.batch_norm_stats``: fp32 per-channel mean and
    ``1 / sqrt(biased var + eps)`` (0 where ``var == eps == 0``, like the CUDA kernel)."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    keep = (var != 0) | (eps != 0)
    invstd = torch.where(keep, torch.rsqrt(var + eps), torch.zeros_like(var))
    return mean, invstd


def batch_norm_elemt_cpu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         mean: Tensor, invstd: Tensor, eps: float,  # noqa: ARG001
                         out: Optional[Tensor] = None) -> Tensor:
    """CPU stand-in of ``torch.batch_norm_elemt``: ``(x - mean) * invstd * weight + bias``
    computed in fp32, written in ``x.dtype`` (into ``out`` if given)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x.float() - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.float().view(shape)
    if bias is not None:
        y = y + bias.float().view(shape)
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)


# ----------------------------------------------------------------------------- shared math
def var_from_invstd(invstd: Tensor) -> Tensor:
    """Biased variance from an inverse std computed with ``eps = 0`` (no cancellation:
    ``1 / invstd**2``; a constant channel has ``invstd == 0`` and variance 0)."""
    return torch.where(invstd > 0, invstd.reciprocal().square(), torch.zeros_like(invstd))


def mix_statistics(mean_b: Tensor, var_b: Tensor, running_mean: Tensor, running_var: Tensor,
                   alpha: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Normalisation statistics of every (view, group) slice.

    Args:
        mean_b, var_b: (V, G, C) fp32 batch statistics (biased variance).
        running_mean, running_var: (G, C) fp32.
        alpha: 0-dim weight of the batch statistics.

    Returns:
        ``(mean, invstd)``, (V, G, C) fp32, with ``invstd = 1 / sqrt(var + eps)``.
    """
    a = alpha.float()
    mean = a * mean_b + (1 - a) * running_mean
    var = a * var_b + (1 - a) * running_var
    return mean, torch.rsqrt(var + eps)


@torch.no_grad()
def update_running_(running_mean: Tensor, running_var: Tensor, mean_b: Tensor, var_b: Tensor,
                    alpha: Tensor) -> None:
    """Lazy update in place: ``run <- alpha * mean_over_views(batch) + (1 - alpha) * run``."""
    running_mean.lerp_(mean_b.mean(0).view_as(running_mean), alpha.float())
    running_var.lerp_(var_b.mean(0).view_as(running_var), alpha.float())


def _check(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor) -> int:
    slices = num_views * num_groups
    if x.dim() < 2 or x.shape[0] % slices:
        raise ValueError(f"Momentum BN: batch of shape {tuple(x.shape)} does not split into "
                         f"{num_views} views x {num_groups} groups")
    if running_mean.numel() != num_groups * x.shape[1]:
        raise ValueError(f"Momentum BN: running statistics of shape {tuple(running_mean.shape)} "
                         f"for {num_groups} groups of {x.shape[1]} channels")
    return x.shape[0] // slices


def momentum_bn_train(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor,
                      running_var: Tensor, alpha: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], eps: float, stats_fn: StatsFn,
                      elemt_fn: ElemtFn) -> Tensor:
    """Momentum BN training forward with injected kernels (see the module docstring).

    ``stats_fn(slice, 0.0) -> (mean, invstd)`` and ``elemt_fn(slice, weight, bias, mean,
    invstd, eps, out=...)`` have the signatures of ``torch.batch_norm_stats`` /
    ``torch.batch_norm_elemt``. Not differentiable through ``x`` (the teacher runs under
    ``no_grad``); running statistics are updated in place.
    """
    n = _check(x, num_views, num_groups, running_mean)
    v, g, c = num_views, num_groups, x.shape[1]
    parts = [x[i * n : (i + 1) * n] for i in range(v * g)]
    stats = [stats_fn(p, 0.0) for p in parts]  # eps 0: the exact biased variance comes back
    mean_b = torch.stack([m for m, _ in stats]).view(v, g, c)
    var_b = var_from_invstd(torch.stack([s for _, s in stats])).view(v, g, c)
    rm, rv = running_mean.view(g, c), running_var.view(g, c)
    mean, invstd = mix_statistics(mean_b, var_b, rm, rv, alpha, eps)
    mean, invstd = mean.view(v * g, c), invstd.view(v * g, c)
    if torch.compiler.is_compiling():  # out= variants do not trace well; let the compiler fuse
        y = torch.cat([elemt_fn(p, weight, bias, mean[i], invstd[i], eps)
                       for i, p in enumerate(parts)])
    else:
        y = torch.empty_like(x)  # same memory format as x
        for i, p in enumerate(parts):
            elemt_fn(p, weight, bias, mean[i], invstd[i], eps, out=y[i * n : (i + 1) * n])
    update_running_(running_mean, running_var, mean_b, var_b, alpha)
    return y


def momentum_bn_train_plain(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor,
                            running_var: Tensor, alpha: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor], eps: float) -> Tensor:
    """Differentiable fp32 composite of the same forward (the fallback when a gradient is
    needed); makes an fp32 copy of ``x``."""
    n = _check(x, num_views, num_groups, running_mean)
    v, g, c = num_views, num_groups, x.shape[1]
    xf = x.float().reshape(v, g, n, c, -1)
    var_b, mean_b = torch.var_mean(xf, dim=(2, 4), correction=0)  # (V, G, C)
    mean, invstd = mix_statistics(mean_b, var_b, running_mean.view(g, c),
                                  running_var.view(g, c), alpha, eps)
    scale = invstd if weight is None else invstd * weight.float()
    shift = -mean * scale if bias is None else bias.float() - mean * scale
    y = xf * scale[:, :, None, :, None] + shift[:, :, None, :, None]
    update_running_(running_mean, running_var, mean_b.detach(), var_b.detach(), alpha)
    return y.reshape(x.shape).to(x.dtype).contiguous(memory_format=_memory_format(x))


def _memory_format(x: Tensor) -> torch.memory_format:
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if cl and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _needs_grad(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))


def momentum_bn_train_fused(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor,
                            running_var: Tensor, alpha: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor], eps: float) -> Tensor:
    """Momentum BN training forward on CUDA: one ``batch_norm_stats`` and one
    ``batch_norm_elemt`` pass per (view, group) slice, output in ``x.dtype``.

    Args:
        x: (B, C, *spatial) CUDA tensor (contiguous or channels_last), laid out
            ``[view][group][sample]``, ``B = num_views * num_groups * n``.
        num_views, num_groups: V and G.
        running_mean, running_var: fp32, (G, C) (or (C,) when G == 1); updated in place.
        alpha: 0-dim fp32 tensor, the weight of the current batch.
        weight, bias: affine parameters (C,) or None.
        eps: added to the mixed variance.

    Returns:
        The normalised batch, same shape, dtype and memory format as ``x``.

    When a gradient is needed (``x``, ``weight`` or ``bias`` requires grad with grad mode
    on; neither M2's teacher nor MoCo's key encoder does, both run under ``no_grad``), the
    differentiable :func:`momentum_bn_train_plain` is used instead.
    """
    if _needs_grad(x, weight, bias):
        return momentum_bn_train_plain(x, num_views, num_groups, running_mean, running_var,
                                       alpha, weight, bias, eps)
    return momentum_bn_train(x, num_views, num_groups, running_mean, running_var, alpha, weight,
                             bias, eps, torch.batch_norm_stats, torch.batch_norm_elemt)

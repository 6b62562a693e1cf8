"""Momentum BN training forward at plain-BN cost on CUDA.

Built on the two kernels ``SyncBatchNorm`` uses: ``torch.batch_norm_stats`` (fp32 mean and
inverse std of a low-precision, contiguous or channels_last batch in one pass) and
``torch.batch_norm_elemt`` (one normalising pass that writes the input dtype). Per
(view, group) slice of the batch: one statistics pass, one normalising pass; the momentum mix
and the lazy running-statistics update are a few small (2, V, G, C) fp32 tensor ops. No fp32
copy of the activation is made, alpha stays a tensor (no host sync). Under ``torch.compile``
the layer uses its composite math instead, which inductor fuses with the neighbouring ops.

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


# A tiny eps for the statistics pass: ``invstd ** -2`` is then the biased variance to fp32
# precision (plus 1e-30), and a constant channel gives a finite invstd (variance ~1e-30)
# instead of a 0 that would need its own case.
STATS_EPS = 1e-30


def momentum_bn_train(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor,
                      running_var: Tensor, alpha: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], eps: float, stats_fn: StatsFn,
                      elemt_fn: ElemtFn) -> Tensor:
    """Momentum BN training forward with injected kernels (see the module docstring).

    ``stats_fn(slice, eps) -> (mean, invstd)`` and ``elemt_fn(slice, weight, bias, mean,
    invstd, eps, out=...)`` have the signatures of ``torch.batch_norm_stats`` /
    ``torch.batch_norm_elemt``. Not differentiable through ``x`` (the teacher runs under
    ``no_grad``); running statistics are updated in place.

    Launches for K = V * G slices: K statistics passes, K normalising passes, and 8 small
    ones: one concatenation of every (mean, invstd) with the running statistics, the
    variance from invstd, the momentum mix (``lerp``), the lazy update (the mean over views
    of the mixed statistics is exactly ``run + alpha * (mean_v(batch) - run)``), written back
    with one ``_foreach_copy_``, ``+ eps`` and ``rsqrt``, and the output allocation.
    """
    n = _check(x, num_views, num_groups, running_mean)
    v, g, c = num_views, num_groups, x.shape[1]
    k = v * g
    parts = [x[i * n : (i + 1) * n] for i in range(k)]
    stats = [stats_fn(p, STATS_EPS) for p in parts]
    rm, rv = running_mean.view(g, c), running_var.view(g, c)
    # (2, K + G, C): [mean | invstd] x [K slices, then the G running rows]
    table = torch.cat([s[0][None] for s in stats] + [rm] + [s[1][None] for s in stats] + [rv])
    table = table.view(2, k + g, c)
    table[1, :k].pow_(-2)  # batch variance (+1e-30)
    batch = table[:, :k].view(2, v, g, c)
    mixed = torch.lerp(table[:, k:].view(2, 1, g, c), batch, alpha)  # (2, V, G, C)
    new_run = mixed.mean(1)  # the lazy update
    torch._foreach_copy_([rm, rv], [new_run[0], new_run[1]])
    invstd = mixed[1].add_(eps).rsqrt_().view(k, c)
    mean = mixed[0].view(k, c)
    if k == 1:
        return elemt_fn(x, weight, bias, mean[0], invstd[0], eps)
    y = torch.empty_like(x)  # same memory format as x
    for i, p in enumerate(parts):
        elemt_fn(p, weight, bias, mean[i], invstd[i], eps, out=y[i * n : (i + 1) * n])
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


def fused_kernels_available(x: Tensor) -> bool:
    """Whether ``x``'s device has ``batch_norm_stats`` and ``batch_norm_elemt`` kernels (CUDA
    always; the CPU only when registered, as the tests do)."""
    if x.is_cuda:
        return True
    key = x.device.type.upper()
    return key == "CPU" and all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                                for op in _FUSED_OPS)


_FUSED_OPS = ("aten::batch_norm_stats", "aten::batch_norm_elemt", "aten::batch_norm_elemt.out")


def _needs_grad(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))


def momentum_bn_train_fused(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor,
                            running_var: Tensor, alpha: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor], eps: float) -> Tensor:
    """Momentum BN training forward with the native kernels (CUDA): one ``batch_norm_stats``
    and one ``batch_norm_elemt`` pass per (view, group) slice, output in ``x.dtype``.

    Args:
        x: (B, C, *spatial) tensor (contiguous or channels_last) on a device with the two
            kernels (:func:`fused_kernels_available`), laid out
            ``[view][group][sample]``, ``B = num_views * num_groups * n``.
        num_views, num_groups: V and G.
        running_mean, running_var: fp32, (G, C) (or (C,) when G == 1); updated in place.
        alpha: 0-dim fp32 tensor, the weight of the current batch.
        weight, bias: affine parameters (C,) or None.
        eps: added to the mixed variance.

    Returns:
        The normalised batch, same shape, dtype and memory format as ``x``.

    When a gradient is needed (``x``, ``weight`` or ``bias`` requires grad with grad mode
    on; neither M2's teacher nor MoCo's key encoder does, both run under ``no_grad``) and under
    ``torch.compile`` (inductor fuses the composite math; the two ops have no fake kernels),
    the composite :func:`momentum_bn_train_plain` is used instead.
    """
    if _needs_grad(x, weight, bias) or torch.compiler.is_compiling():
        return momentum_bn_train_plain(x, num_views, num_groups, running_mean, running_var,
                                       alpha, weight, bias, eps)
    return momentum_bn_train(x, num_views, num_groups, running_mean, running_var, alpha, weight,
                             bias, eps, torch.batch_norm_stats, torch.batch_norm_elemt)

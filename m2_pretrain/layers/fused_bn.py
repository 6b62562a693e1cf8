"""Momentum BN training forward: one readable composite and one fused CUDA path.

* :func:`momentum_bn_train_composite` is the math as written in docs/method.md, in fp32
  whatever the input dtype. It is differentiable, runs on any device, and under
  ``torch.compile`` inductor fuses it with the neighbouring ops.
* :func:`momentum_bn_train` is the eager fast path, built on native batch-norm kernels:
  ``torch.batch_norm_update_stats`` without running statistics (on CUDA the Welford pass of
  ``torch.batch_norm_stats``, returning the fp32 mean and biased variance of a low-precision,
  contiguous or channels_last batch) and ``torch.batch_norm_elemt`` (``SyncBatchNorm``'s one
  normalising pass, written in the input dtype). Per (view, group) slice of the batch: one
  statistics pass and one normalising pass; the momentum mix, the lazy running-statistics
  update and ``+ eps`` are one small matrix product. No fp32 copy of the activation
  is made; alpha stays a tensor (no host sync). The kernels are arguments, so tests can pass
  CPU ones.
* :func:`momentum_bn_train_fused` chooses: the fast path where the kernels exist and no
  gradient is needed, the composite otherwise and under ``torch.compile``. On the CPU the fast
  path serves fp32 inputs, with the native CPU ``batch_norm_update_stats`` and
  :func:`batch_norm_elemt_cpu` (inference-mode native batch norm) as the two kernels: the
  statistics pass of BN itself, several times faster than a ``var_mean`` over a strided view.
  The first fused call per process, device and dtype is checked against the composite on the
  same batch; a failure switches that device and dtype to the composite
  (:func:`fused_bn_status`, docs/method.md "Self-check of the fused path").

Both paths compute the statistics, the mix and the lazy update in fp32 with autocast off
(under bf16/fp16 autocast the mix's matrix product would run in 16 bits, handing the kernels
16-bit ``mean``/``invstd`` and rounding the running statistics); the output keeps the input's
dtype and memory format.

Semantics (docs/method.md, "Momentum BN"): the batch is ``[view][group][sample]``; each slice is
normalised with ``alpha * batch + (1 - alpha) * running`` statistics of its group (biased
variance), then the group's running statistics take ``alpha`` of the mean over views of its
batch statistics.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch

from .memory import memory_format_of

logger = logging.getLogger(__name__)
Tensor = torch.Tensor
StatsFn = Callable[[Tensor, Optional[Tensor], Optional[Tensor], float], tuple[Tensor, Tensor]]
ElemtFn = Callable[..., Tensor]


def _check(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor) -> int:
    """Samples per (view, group) slice; a one-line error when the shapes do not fit."""
    slices = num_views * num_groups
    if x.dim() < 2 or x.shape[0] % slices:
        raise ValueError(f"Momentum BN: batch of shape {tuple(x.shape)} is not divisible into "
                         f"{num_views} views x {num_groups} groups")
    if running_mean.numel() != num_groups * x.shape[1]:
        raise ValueError(f"Momentum BN: running statistics of shape {tuple(running_mean.shape)} "
                         f"for {num_groups} groups of {x.shape[1]} channels")
    return x.shape[0] // slices


# ----------------------------------------------------------------------------- composite
def momentum_bn_train_composite(x: Tensor, num_views: int, num_groups: int,
                                running_mean: Tensor, running_var: Tensor, alpha: Tensor,
                                weight: Optional[Tensor], bias: Optional[Tensor],
                                eps: float) -> Tensor:
    """Momentum BN training forward as plain tensor math (arguments as
    :func:`momentum_bn_train_fused`). Statistics and the normalisation are computed in fp32
    (an fp32 copy of ``x``); differentiable through ``x``, ``weight`` and ``bias``; the running
    statistics are updated in place without gradient."""
    with torch.autocast(x.device.type, enabled=False):  # fp32 statistics (module docstring)
        return _composite(x, num_views, num_groups, running_mean, running_var, alpha, weight,
                          bias, eps)


def _composite(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor,
               running_var: Tensor, alpha: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], eps: float) -> Tensor:
    n = _check(x, num_views, num_groups, running_mean)
    v, g, c = num_views, num_groups, x.shape[1]
    xf = x.float().view(v, g, n, *x.shape[1:])  # (V, G, N, C, *spatial); splits dim 0 only
    var_b, mean_b = torch.var_mean(xf, dim=[2, *range(4, xf.dim())], correction=0)  # (V, G, C)
    a = alpha.float()
    rm, rv = running_mean.view(g, c), running_var.view(g, c)
    scale = torch.rsqrt(torch.lerp(rv, var_b, a) + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -torch.lerp(rm, mean_b, a) * scale
    if bias is not None:
        shift = shift + bias.float()
    shape = (v, g, 1, c) + (1,) * (x.dim() - 2)
    y = torch.addcmul(shift.view(shape), xf, scale.view(shape))  # one pass
    with torch.no_grad():  # the lazy update: each group from the mean over its views
        rm.lerp_(mean_b.detach().mean(0), a)
        rv.lerp_(var_b.detach().mean(0), a)
    return y.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format_of(x))


# ----------------------------------------------------------------------------- fused
@functools.lru_cache(maxsize=None)
def _mixing(num_views: int, num_groups: int, eps: float,
            device: torch.device) -> tuple[Tensor, Tensor]:
    """Constants of the statistics mix as one matrix product ``out = M(alpha) @ T``.

    ``T`` (2R + 1, C), R = K + G, holds the K = V * G slices' batch means, the G running
    means, the K batch variances, the G running variances and a row of ones. ``out`` (2R, C)
    holds the K slices' mixed means, the G new running means, the K slices' mixed variances
    ``+ eps`` (from the ones row) and the G new running variances.
    ``M(alpha) = lerp(M0, M1, alpha)``, the same block for means and variances:

    * slice k = (v, g): ``M0`` picks running row g, ``M1`` picks batch row k;
    * running row g: ``M0`` keeps it, ``M1`` averages batch rows (v, g) over the V views.

    Built with device factories (no copy from the host).
    """
    v, g, k = num_views, num_groups, num_views * num_groups
    eye_g = torch.eye(g, device=device)
    pick_group = eye_g.repeat(v, 1)  # (K, G): slice k belongs to group k % G
    zeros = functools.partial(torch.zeros, device=device)
    m0 = torch.cat([torch.cat([zeros(k, k), pick_group], 1), torch.cat([zeros(g, k), eye_g], 1)])
    m1 = torch.cat([torch.cat([torch.eye(k, device=device), zeros(k, g)], 1),
                    torch.cat([pick_group.t() / v, zeros(g, g)], 1)])
    eps_col = zeros(2 * (k + g), 1)
    eps_col[k + g : 2 * k + g] = eps  # the mixed variances only
    return tuple(torch.cat([torch.block_diag(m, m), eps_col], 1) for m in (m0, m1))


@functools.lru_cache(maxsize=None)
def _ones(c: int, device: torch.device) -> Tensor:
    return torch.ones(1, c, device=device)


def _ieee_matmul(t: Tensor) -> bool:
    """Whether fp32 matrix products on ``t``'s device are computed in full fp32 precision (not
    TF32 or bf16, see ``torch.backends.*.matmul.fp32_precision``)."""
    backend = torch.backends.cuda.matmul if t.is_cuda else torch.backends.mkldnn.matmul
    return backend.fp32_precision in ("none", "ieee")


def momentum_bn_train(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor,
                      running_var: Tensor, alpha: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], eps: float,
                      stats_fn: StatsFn = torch.batch_norm_update_stats,
                      elemt_fn: ElemtFn = torch.batch_norm_elemt) -> Tensor:
    """Momentum BN training forward on the two fused kernels (arguments as
    :func:`momentum_bn_train_fused`; see the module docstring).

    ``stats_fn(slice, None, None, momentum) -> (mean, var)`` and ``elemt_fn(slice, weight,
    bias, mean, invstd, eps, out=...)`` have the signatures of
    ``torch.batch_norm_update_stats`` / ``torch.batch_norm_elemt``. Not differentiable through
    ``x`` (the teacher runs under ``no_grad``); the running statistics are updated in place.

    Launches for K = V * G slices: K statistics passes, K normalising passes and 5 small ones:
    one concatenation of the slices' (mean, var) with the running statistics, the mixing
    matrix from alpha, one matrix product (no added input, so no copy before the GEMM) giving
    every slice's mixed (mean, var + eps) and the new running statistics, ``rsqrt``, and one
    ``_foreach_copy_`` into the running buffers. With K > 1 the output is allocated once (no
    launch).
    """
    n = _check(x, num_views, num_groups, running_mean)
    v, g, c = num_views, num_groups, x.shape[1]
    k = v * g
    parts = [x[i * n : (i + 1) * n] for i in range(k)]
    rm, rv = running_mean.view(g, c), running_var.view(g, c)
    # Autocast would run the mix (a matrix product) in bf16/fp16: the statistics, the lazy
    # update and the kernels' fp32 mean/invstd contract all need fp32 (as SyncBatchNorm).
    with torch.autocast(x.device.type, enabled=False):
        stats = [stats_fn(p, None, None, 0.0) for p in parts]  # fp32 (mean, biased var)
        table = torch.cat([s[0][None] for s in stats] + [rm] + [s[1][None] for s in stats]
                          + [rv, _ones(c, x.device)])  # (2R + 1, C), R = K + G
        m0, m1 = _mixing(v, g, float(eps), x.device)
        mix = torch.lerp(m0, m1, alpha)
        if _ieee_matmul(table):
            out = torch.mm(mix, table)  # (2R, C)
        else:  # reduced-precision fp32 products would cost the statistics their precision
            out = torch.mm(mix.double(), table.double()).float()
        r = k + g
        torch._foreach_copy_([rm, rv], [out[k:r], out[r + k :]])  # the lazy update
        mean, invstd = out[:k], out[r : r + k].rsqrt_()
    if k == 1:
        return elemt_fn(x, weight, bias, mean[0], invstd[0], eps)
    y = torch.empty_like(x)  # same memory format as x
    for i, p in enumerate(parts):
        elemt_fn(p, weight, bias, mean[i], invstd[i], eps, out=y[i * n : (i + 1) * n])
    return y


# ----------------------------------------------------------------------------- CPU kernels
def batch_norm_elemt_cpu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         mean: Tensor, invstd: Tensor, eps: float,  # noqa: ARG001
                         out: Optional[Tensor] = None) -> Tensor:
    """``torch.batch_norm_elemt`` for fp32 CPU tensors: ``(x - mean) * invstd * weight +
    bias`` as inference-mode native batch norm (variance ``invstd ** -2``, eps 0), written into
    ``out`` when given (a slice of a larger output, in ``x``'s memory format)."""
    var = invstd.pow(-2)
    if out is None:
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, 0.0, False)
    torch.ops.aten.native_batch_norm.out(x, weight, bias, mean, var, False, 0.0, 0.0, out=out,
                                         save_mean=x.new_empty(0), save_invstd=x.new_empty(0))
    return out


# ----------------------------------------------------------------------------- self-check
# (device, dtype, path) -> None once the fused path matched the composite there, or the
# reason it was disabled. One entry per process and combination (see momentum_bn_train_fused).
_SELF_CHECK: dict[tuple[str, torch.dtype, str], Optional[str]] = {}


def self_check_tolerance(dtype: torch.dtype) -> float:
    """Largest accepted difference between the fused and the composite output, relative to
    ``max(1, max |composite output|)``: four units in the last place of ``dtype`` (16-bit
    outputs are two roundings of nearly equal fp32 values), at least 1e-4 (fp32: a Welford
    and a two-pass variance). The running statistics must agree to 1e-4 relative."""
    return max(4 * torch.finfo(dtype).eps, 1e-4)


def _compare(y: Tensor, ref: Tensor, x: Tensor, stats: list[Tensor],
             ref_stats: list[Tensor]) -> Optional[str]:
    """Why the fused result differs from the composite's, or None."""
    fmt = memory_format_of(x)
    if y.dtype != x.dtype or y.shape != x.shape or not y.is_contiguous(memory_format=fmt):
        return (f"output {y.dtype} {tuple(y.shape)} strides {y.stride()} for an input "
                f"{x.dtype} in {fmt}")
    scale = max(1.0, float(ref.float().abs().max()))
    err = float((y.float() - ref.float()).abs().max()) / scale
    if not err <= self_check_tolerance(x.dtype):  # also catches NaN
        return (f"output differs from the composite by {err:.3g} (relative; tolerance "
                f"{self_check_tolerance(x.dtype):.3g})")
    for name, a, b in zip(("running mean", "running var"), stats, ref_stats):
        err = float(((a - b).abs() / (1 + b.abs())).max())
        if not err <= 1e-4:
            return f"{name} differs from the composite's by {err:.3g} (tolerance 1e-4)"
    return None


def _self_checked(path: str, fused: Callable[..., Tensor], args: tuple) -> Tensor:
    """``fused(*args)``, checked against the composite the first time ``path`` runs for this
    device and dtype in the process; after a failure, the composite."""
    x, v, g, rm, rv, alpha, weight, bias, eps = args
    key = (str(x.device), x.dtype, path)
    state = _SELF_CHECK.get(key, "unchecked")
    if state is None:
        return fused(*args)
    if state != "unchecked":
        return momentum_bn_train_composite(*args)
    # both on copies of the running statistics; the layer keeps the result it returns
    ref_stats = [rm.clone(), rv.clone()]
    ref = momentum_bn_train_composite(x, v, g, *ref_stats, alpha, weight, bias, eps)
    stats = [rm.clone(), rv.clone()]
    try:
        y = fused(x, v, g, *stats, alpha, weight, bias, eps)
        reason = _compare(y, ref, x, stats, ref_stats)
    except Exception as e:  # noqa: BLE001 - any failure of the kernels disables them
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    _SELF_CHECK[key] = reason
    if reason is None:  # what a run without the check computes, bit for bit
        torch._foreach_copy_([rm, rv], stats)
        return y
    logger.warning("Momentum BN: the fused path failed its self-check on %s %s (torch %s): "
                   "%s; using the composite from now on", x.device, x.dtype,
                   torch.__version__, reason)
    torch._foreach_copy_([rm, rv], ref_stats)
    return ref


def fused_bn_status() -> str:
    """The fused path's state in this process, for a run's metadata: ``"disabled (<device>
    <dtype>: <reason>)"`` after a failed self-check, else ``"enabled (checked on ...)"``, or
    ``"not used"``."""
    failed = [f"{d} {str(t).replace('torch.', '')}: {r}" for (d, t, _), r in _SELF_CHECK.items()
              if r is not None]
    if failed:
        return f"disabled ({'; '.join(failed)})"
    passed = sorted({f"{d} {str(t).replace('torch.', '')}" for d, t, _ in _SELF_CHECK})
    return f"enabled (checked on {', '.join(passed)})" if passed else "not used"


def reset_self_check() -> None:
    """Forget every self-check result (tests that register other kernels)."""
    _SELF_CHECK.clear()


# ----------------------------------------------------------------------------- dispatch
_FUSED_OPS = ("aten::batch_norm_elemt", "aten::batch_norm_elemt.out")


def fused_kernels_available(x: Tensor) -> bool:
    """Whether ``x``'s device has the ``batch_norm_elemt`` kernels (CUDA always; the CPU only
    when registered, as the tests do, with a ``batch_norm_update_stats`` of CUDA's contract)."""
    if x.is_cuda:
        return True
    key = x.device.type.upper()
    return key == "CPU" and all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                                for op in _FUSED_OPS)


def momentum_bn_train_fused(x: Tensor, num_views: int, num_groups: int, running_mean: Tensor,
                            running_var: Tensor, alpha: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor], eps: float) -> Tensor:
    """Momentum BN training forward, on the fused kernels wherever they serve.

    Args:
        x: (B, C, *spatial) tensor, laid out ``[view][group][sample]``,
            ``B = num_views * num_groups * n``.
        num_views, num_groups: V and G.
        running_mean, running_var: fp32, (G, C) (or (C,) when G == 1); updated in place.
        alpha: 0-dim fp32 tensor, the weight of the current batch.
        weight, bias: affine parameters (C,) or None.
        eps: added to the mixed variance.

    Returns:
        The normalised batch, same shape, dtype and memory format as ``x``.

    :func:`momentum_bn_train` (one statistics and one ``batch_norm_elemt`` pass per (view,
    group) slice) runs when ``x``'s device has the kernels (:func:`fused_kernels_available`),
    ``x`` is not fp64 and no gradient is needed (neither M2's teacher nor MoCo's key encoder
    needs one: both run under ``no_grad``).
    On a CPU without registered ``batch_norm_elemt`` kernels, an fp32 ``x`` takes the same
    path on the native CPU statistics kernel and :func:`batch_norm_elemt_cpu` (the CPU's
    ``batch_norm_update_stats`` keeps a bf16 input's statistics in bf16, so other dtypes take
    the composite).
    :func:`momentum_bn_train_composite` runs otherwise, and under ``torch.compile``, where
    inductor fuses it with the neighbouring ops (the two kernels have no fake kernels).
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    args = (x, num_views, num_groups, running_mean, running_var, alpha, weight, bias, eps)
    if torch.compiler.is_compiling() or needs_grad or x.dtype == torch.float64:
        return momentum_bn_train_composite(*args)
    if fused_kernels_available(x):
        return _self_checked("kernels", momentum_bn_train, args)
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return _self_checked("cpu", _momentum_bn_train_cpu, args)
    return momentum_bn_train_composite(*args)


def _momentum_bn_train_cpu(*args) -> Tensor:
    return momentum_bn_train(*args, elemt_fn=batch_norm_elemt_cpu)

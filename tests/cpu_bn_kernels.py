"""CPU kernels for ``aten::batch_norm_elemt`` (and ``.out``) and
``aten::batch_norm_update_stats``, registered with ``torch.library`` for the duration of a
``with`` block.

PyTorch ships ``batch_norm_elemt`` for CUDA only (``SyncBatchNorm``'s kernel), and its CPU
``batch_norm_update_stats`` returns the input's dtype where CUDA's returns fp32. Registered on
CPU, the Momentum BN layer takes its fused path on CPU tensors, so the tests run that path (and
``torch.compile`` over it) without a GPU. The kernels are written from the CUDA kernels'
contract and check it on every call:

* ``batch_norm_update_stats(input, None, None, momentum) -> (mean, var)``: input (N, C, *) of
  any layout; (C,) contiguous outputs in fp32 (fp64 for an fp64 input); the biased variance.
  Only the form without running statistics is provided.
* ``batch_norm_elemt(input, weight, bias, mean, invstd, eps[, out])``: ``mean`` and ``invstd``
  fp32 1-D contiguous (C,); weight and bias (C,) in fp32 or the input's dtype; the output has
  the input's dtype and strides (``out`` must already have them); computed in fp32.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

Tensor = torch.Tensor
CALLS = {"stats": 0, "elemt": 0}


def _check_stat(name: str, t: Tensor, c: int) -> None:
    if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != c or not t.is_contiguous():
        raise RuntimeError(f"batch_norm_elemt: {name} must be fp32 1-D contiguous ({c},), got "
                           f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")


def _check_param(name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is None:
        return
    if t.dtype not in (torch.float32, x.dtype) or t.shape != (x.shape[1],):
        raise RuntimeError(f"batch_norm_elemt: {name} {t.dtype} {tuple(t.shape)} for an input "
                           f"{x.dtype} with {x.shape[1]} channels")


def stats_kernel(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 momentum: float) -> tuple[Tensor, Tensor]:  # noqa: ARG001
    if x.dim() < 2 or x.numel() == 0 or not x.is_floating_point():
        raise RuntimeError(f"batch_norm_update_stats: input {x.dtype} {tuple(x.shape)} is not a "
                           f"non-empty float batch (N, C, *)")
    if running_mean is not None or running_var is not None:
        raise NotImplementedError("batch_norm_update_stats: only without running statistics")
    CALLS["stats"] += 1
    xd = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = xd.mean(1)
    var = (xd - mean[:, None]).square().mean(1)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return mean.to(acc), var.to(acc)


def _elemt_values(x: Tensor, weight, bias, mean: Tensor, invstd: Tensor) -> Tensor:
    if x.dim() < 2 or not x.is_floating_point():
        raise RuntimeError(f"batch_norm_elemt: bad input {x.dtype} {tuple(x.shape)}")
    c = x.shape[1]
    _check_stat("mean", mean, c)
    _check_stat("invstd", invstd, c)
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)
    CALLS["elemt"] += 1
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = (x.float() - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.float().view(shape)
    if bias is not None:
        y = y + bias.float().view(shape)
    return y


def elemt_kernel(x, weight, bias, mean, invstd, eps):  # noqa: ARG001
    y = _elemt_values(x, weight, bias, mean, invstd)
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return out.copy_(y)


def elemt_out_kernel(x, weight, bias, mean, invstd, eps, *, out):  # noqa: ARG001
    if out.dtype != x.dtype or out.shape != x.shape or out.stride() != x.stride():
        raise RuntimeError(f"batch_norm_elemt.out: out {out.dtype} {tuple(out.shape)} strides "
                           f"{out.stride()} differs from the input's {x.dtype} {x.stride()}")
    return out.copy_(_elemt_values(x, weight, bias, mean, invstd))


def elemt(x, weight, bias, mean, invstd, eps, out=None):
    """Both ``batch_norm_elemt`` kernels as one function, with the op's signature: what the
    tests pass to ``momentum_bn_train`` as ``elemt_fn`` (``stats_kernel`` as ``stats_fn``)."""
    if out is None:
        return elemt_kernel(x, weight, bias, mean, invstd, eps)
    return elemt_out_kernel(x, weight, bias, mean, invstd, eps, out=out)


@contextlib.contextmanager
def cpu_bn_kernels() -> Iterator[dict]:
    """Register the CPU kernels; removed again on exit. Yields the call counters."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("aten::batch_norm_elemt", "CPU"):
        raise RuntimeError("this torch build has CPU kernels for batch_norm_elemt already")
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("batch_norm_update_stats", stats_kernel, "CPU")
        lib.impl("batch_norm_elemt", elemt_kernel, "CPU")
        lib.impl("batch_norm_elemt.out", elemt_out_kernel, "CPU")
        CALLS.update(stats=0, elemt=0)
        yield CALLS
    finally:
        lib._destroy()

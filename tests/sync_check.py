"""Find, on CPU, what would make a training step wait for a CUDA device.

:class:`SyncRecorder` is a ``TorchDispatchMode`` that follows "device" tensors: the model's and
the augmenter's parameters and buffers, the optimizer's state, the step's input batch and every
tensor computed from them. It records a violation for

* ``item`` / ``_local_scalar_dense`` / ``is_nonzero`` or any op tagged
  ``data_dependent_output`` on a device tensor (a read to the host: ``int(t)``, ``bool(t)``);
* any op tagged ``dynamic_output_shape`` on a device tensor (``nonzero``, ``masked_select``,
  boolean indexing: the output size must come back to the host);
* a tensor made from Python data inside the step (``torch.tensor(...)``,
  ``torch.as_tensor(number)``, seen as ``lift_fresh``) meeting a device tensor in an op
  (``copy_`` into a buffer included): on CUDA that is a copy from pageable host memory, which
  synchronises.

Host-side tensors (parameters drawn from a CPU generator, tables computed from them) may
meet device tensors: the code moves them with ``non_blocking=True``, which is a no-op on CPU
and invisible here; so is a ``.to(device)`` without it (a limit of checking on CPU).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
_INDEX = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
          aten._index_put_impl_.default}


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class SyncRecorder(TorchDispatchMode):
    """Record ops that would synchronise a CUDA device (see the module docstring)."""

    def __init__(self, device_tensors: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self._keep: list[torch.Tensor] = []  # keeps storages alive: no address reuse
        self._device: set[int] = set()
        self._fresh: set[int] = set()
        self.violations: list[str] = []
        self.ops: list[str] = []
        for t in device_tensors:
            self._mark(t, self._device)

    def _mark(self, t: torch.Tensor, where: set) -> None:
        if t.untyped_storage().nbytes() == 0:
            return
        self._keep.append(t)
        where.add(_key(t))

    def is_device(self, t: torch.Tensor) -> bool:
        return isinstance(t, torch.Tensor) and _key(t) in self._device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_device = any(self.is_device(t) for t in tensors)
        fresh = [t for t in tensors if _key(t) in self._fresh and t.untyped_storage().nbytes()]
        name = str(func)
        self.ops.append(name)
        if on_device:
            if func in _READS or torch.Tag.data_dependent_output in func.tags:
                self.violations.append(f"{name}: reads a device value on the host")
            elif func in _INDEX:
                idx = args[1] if len(args) > 1 else kwargs.get("indices")
                if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in idx):
                    self.violations.append(f"{name} with a boolean mask: data-dependent shape")
            elif torch.Tag.dynamic_output_shape in func.tags:
                self.violations.append(f"{name}: data-dependent output shape")
            if fresh:
                self.violations.append(f"{name}: a tensor made from Python data inside the step "
                                       f"meets a device tensor (a host-to-device copy)")
        out = func(*args, **kwargs)
        outs, _ = tree_flatten(out)
        for t in outs:
            if not isinstance(t, torch.Tensor):
                continue
            if func in (aten.lift_fresh.default, aten.lift_fresh_copy.default):
                self._mark(t, self._fresh)
            elif on_device:
                self._mark(t, self._device)
        return out


def module_tensors(*modules) -> list[torch.Tensor]:
    """Parameters, gradients and buffers of ``modules``."""
    out = []
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
        out.extend(m.buffers())
    return out


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]

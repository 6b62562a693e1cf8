"""Eager aten ops (non-view) per Momentum BN layer and per augmented view, counted on CPU.

A ``TorchDispatchMode`` counts every aten op that is not a view; with CPU kernels of CUDA's
contract for ``batch_norm_update_stats`` / ``batch_norm_elemt`` (``tests/cpu_bn_kernels.py``),
the Momentum BN layer runs its CUDA (fused) path, so the counts are the CUDA path's op
counts. Each op is at most one kernel launch on CUDA (an ``empty_like`` is an allocation and
launches nothing).

    python benchmarks/op_count.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cpu_bn_kernels import cpu_bn_kernels  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Counts aten ops that are not views; with ``device``, only the ops that read one of
    those tensors or a tensor computed from them (host-side work on CPU parameters is not
    counted: it launches nothing on a GPU)."""

    def __init__(self, device: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self._track = None if device is None else {t.untyped_storage().data_ptr() for t in device}
        self._keep = list(device or [])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._track is None:
            hit = True
        else:
            flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            hit = any(t.untyped_storage().data_ptr() in self._track for t in flat)
            if hit:
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        self._keep.append(t)
                        self._track.add(t.untyped_storage().data_ptr())
        if hit and not func.is_view:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


# ops that only allocate memory: no kernel launch on CUDA
ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty"})


def momentum_bn_ops(groups: int, views: int = 2, c: int = 16, n: int = 4) -> Counter:
    """Ops of one training forward of a Momentum BN layer (fused path) without gradient."""
    from m2_pretrain.layers import MomentumBatchNorm

    layer = MomentumBatchNorm(c, num_views=views, num_groups=groups).requires_grad_(False)
    layer.set_alpha(0.7)
    x = torch.randn(views * groups * n, c, 5, 5)
    with cpu_bn_kernels() as calls, torch.no_grad():
        layer(x)  # warm-up
        with OpCounter() as counter:
            layer(x)
        if calls["stats"] == 0:
            raise RuntimeError("the fused path was not taken")
    return counter.ops


def launches_and_allocations(ops: Counter) -> tuple[int, int]:
    """(ops that launch a kernel on CUDA, ops that only allocate)."""
    alloc = sum(n for k, n in ops.items() if k in ALLOCATIONS)
    return sum(ops.values()) - alloc, alloc


def _augmenter(batch: int, res: int):
    """Teacher-view parameters (every op has a non-empty share of the batch) and a uint8
    channels-last batch, as the trainer hands them over."""
    from m2_pretrain.data.augment import TwoViewTransform
    from m2_pretrain.data.batch_augment import BatchTwoViewAugment

    tf = TwoViewTransform(res)
    aug = BatchTwoViewAugment(tf.student_cfg, tf.teacher_cfg, [0.5] * 3, [0.25] * 3)
    x = torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    _, p = aug.draw(batch, torch.Generator().manual_seed(0))
    return aug, x, p


def augment_ops(batch: int = 256, res: int = 32) -> Counter:
    """Ops on the device of one view (teacher settings) of the eager device-side augmentation,
    uint8 in, normalised float out. Factory ops (allocations, constants) are not counted. On
    CUDA a ``baddbmm`` is two kernels (its broadcast mean term is copied into the output
    before the GEMM adds to it)."""
    aug, x, p = _augmenter(batch, res)
    aug.augment(x, p)
    with OpCounter([x, *aug.buffers()]) as counter:
        aug.augment(x, p)
    return counter.ops


def augment_compiled_kernels(batch: int = 256, res: int = 32) -> dict:
    """Inductor's code for one view with ``compile_colour()`` on the CPU: the generated
    kernels (C++ functions), the library calls (``extern_kernels.*``) and the parallel loop
    nests inside the generated kernels (``#pragma omp for``; a GPU build may launch about
    one kernel per loop nest)."""
    from torch._inductor.utils import run_and_get_code

    aug, x, p = _augmenter(batch, res)
    aug.compile_colour()
    _, code = run_and_get_code(aug.augment, x, p)
    src = "\n".join(code)
    generated = len(re.findall(r"^\w+ = async_compile\.(?:cpp_pybinding|cpp|triton)\(", src,
                               re.M))
    extern = len(re.findall(r"extern_kernels\.\w+\(", src))
    return {"total": generated + extern, "generated": generated, "extern": extern,
            "loop_nests": src.count("#pragma omp for")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = {}
    for g in (1, 4, 8):
        ops = momentum_bn_ops(g)
        launches, alloc = launches_and_allocations(ops)
        out[f"momentum_bn_G{g}"] = {"total": sum(ops.values()), "launches": launches,
                                    "allocations": alloc, "ops": dict(ops)}
        print(f"Momentum BN layer, 2 views, G={g}: {sum(ops.values())} ops = {launches} "
              f"launches + {alloc} allocations  {dict(ops)}")
    ops = augment_ops()
    out["augment_view"] = {"total": sum(ops.values()), "ops": dict(ops)}
    print(f"device augmentation, one view: {sum(ops.values())} ops")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    k = augment_compiled_kernels()
    out["augment_view_compiled"] = k
    print(f"device augmentation, one view, compiled (CPU inductor): {k['total']} kernels "
          f"({k['generated']} generated, {k['extern']} library calls; "
          f"{k['loop_nests']} loop nests)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

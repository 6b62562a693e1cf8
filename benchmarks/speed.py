"""Same-process speed benchmark of one pretraining step against the compute ceiling.

Arms (synthetic batches already on the device; median of interleaved repeats):
  ceiling          student fwd+bwd on both views + teacher fwd (no grad) on both views,
                   plain BN, no heads, no EMA, no optimizer
  byol_bn          full BYOL step with a plain-BN teacher (heads, loss, optimizer, EMA)
  m2               full Momentum² Teacher step as the trainer runs it (fused Momentum BN)
  m2_reference     the same step with an authors'-style Momentum BN (per-view calls, separate
                   mean/var passes, Python-side state, lazy commit)
  m2_grouped       the m2 step with virtual devices (train.bn_group_size): per-group BN in the
                   student and Momentum BN per group in the teacher, one forward for all groups
  mocov2_shuffle   MoCo v2 step, shuffle-BN key encoder        (--moco)
  mocov2_momentum  MoCo v2 step, Momentum BN (alpha 0.064) key  (--moco)

    python benchmarks/speed.py --device cuda --json speed.json          # ResNet-50, 224 px, 128/view
    python benchmarks/speed.py --device cuda --arch resnet18 --res 96 --batch 256
    python benchmarks/speed.py --device cpu --json speed_cpu.json       # small shapes
    python benchmarks/speed.py --pipeline                               # augmentation pairs/s/core

Ratios printed: m2/ceiling, m2/byol_bn, m2_reference/m2, m2_grouped/m2 (and
mocov2_momentum/mocov2_shuffle).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2_pretrain.layers.reference import convert_reference_momentum_bn, reference_layers  # noqa: E402
from m2_pretrain.models import M2Teacher  # noqa: E402
from m2_pretrain.models.encoder import create_encoder  # noqa: E402
from m2_pretrain.models.mocov2 import MoCoV2  # noqa: E402


class ReferenceM2Teacher(M2Teacher):
    """M2 with the authors'-style Momentum BN in the teacher: one call per view, then commit."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["teacher_norm"] = "bn"
        super().__init__(*args, **kwargs)
        convert_reference_momentum_bn(self.teacher)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._ref_layers = reference_layers(self.teacher)

    def set_alpha(self, alpha) -> None:
        for m in self._ref_layers:
            m.alpha = float(alpha)

    @torch.no_grad()
    def teacher_targets(self, v1, v2):
        z1, z2 = self.teacher(v1), self.teacher(v2)
        for m in self._ref_layers:
            m.commit()
        return z1, z2


class Ceiling(nn.Module):
    """Encoders only: student fwd+bwd per view, teacher fwd without grad per view."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.student = create_encoder(arch)
        self.teacher = create_encoder(arch)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def forward(self, v1, v2):
        with torch.no_grad():
            t = self.teacher(v1).sum() + self.teacher(v2).sum()
        return {"loss": self.student(v1).float().mean() + self.student(v2).float().mean() + 0 * t}


def make_arm(name: str, arch: str, heads: dict, batch: int, bn_group_size: int = 0) -> nn.Module:
    if name == "ceiling":
        return Ceiling(arch)
    if name == "byol_bn":
        return M2Teacher(arch, teacher_norm="bn", **heads)
    if name == "m2":
        return M2Teacher(arch, teacher_norm="momentum", **heads)
    if name == "m2_reference":
        return ReferenceM2Teacher(arch, **heads)
    if name == "m2_grouped":
        if not bn_group_size or batch % bn_group_size:
            raise ValueError(f"--bn-group-size must divide --batch ({batch}), got {bn_group_size}")
        return M2Teacher(arch, teacher_norm="momentum", student_norm="bn",
                         bn_groups=batch // bn_group_size, **heads)
    if name.startswith("mocov2_"):
        return MoCoV2(arch, queue_size=65536, key_norm="shuffle_bn" if name.endswith("shuffle") else "momentum",
                      shuffle_splits=max(1, min(8, batch // 2)))  # >= 2 images per sub-batch
    raise ValueError(name)


class Step:
    """One training step of an arm, as the trainer runs it."""

    def __init__(self, name, model, device, amp_dtype, channels_last, compile_):
        self.name, self.model, self.device, self.amp_dtype = name, model.to(device), device, amp_dtype
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.fwd = torch.compile(self.model) if compile_ else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = None if name == "ceiling" else torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        self.k = 0

    def __call__(self, v1, v2):
        if hasattr(self.model, "set_alpha"):
            self.model.set_alpha(0.5 * (1 + torch.cos(torch.tensor(self.k / 1000.0))).item())
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss = self.fwd(v1, v2)["loss"]
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.model.update_teacher(0.01)
        else:
            self.model.zero_grad(set_to_none=True)
        self.k += 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_steps(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda else None
    heads = dict(proj_hidden=args.proj_hidden, proj_out=args.proj_out, pred_hidden=args.proj_hidden)
    arms = ["ceiling", "byol_bn", "m2", "m2_reference", "m2_grouped"] + (["mocov2_shuffle", "mocov2_momentum"] if args.moco else [])
    torch.manual_seed(0)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    v1 = torch.randn(args.batch, 3, args.res, args.res, device=device).contiguous(memory_format=fmt)
    v2 = torch.randn(args.batch, 3, args.res, args.res, device=device).contiguous(memory_format=fmt)
    steps = {a: Step(a, make_arm(a, args.arch, heads, args.batch, args.bn_group_size), device, amp,
                     cuda, args.compile) for a in arms}
    peak = {}
    for a, st in steps.items():  # warm-up (and compilation), peak memory per arm
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            st(v1, v2)
        sync(device)
        peak[a] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    times = {a: [] for a in arms}
    for _ in range(args.repeats):  # interleaved
        for a, st in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.inner):
                st(v1, v2)
            sync(device)
            times[a].append((time.perf_counter() - t0) / args.inner)
    med = {a: statistics.median(t) for a, t in times.items()}
    ratios = {"m2/ceiling": med["m2"] / med["ceiling"], "m2/byol_bn": med["m2"] / med["byol_bn"],
              "m2_reference/m2": med["m2_reference"] / med["m2"],
              "m2_grouped/m2": med["m2_grouped"] / med["m2"]}
    if args.moco:
        ratios["mocov2_momentum/mocov2_shuffle"] = med["mocov2_momentum"] / med["mocov2_shuffle"]
    return {
        "arms": {a: {"median_s": med[a], "all_s": times[a], "images_per_s": 2 * args.batch / med[a],
                     "peak_mem_gib": peak[a]} for a in arms},
        "ratios": ratios,
    }


def _with_torchvision_blur(tf):
    """The same two-view transform with torchvision's GaussianBlur (full 2-D kernel, tensor
    round trip) in place of the pipeline's separable blur: the reference arm."""
    import copy

    import torchvision.transforms as T

    from m2_pretrain.data.augment import RandomGaussianBlur

    ref = copy.deepcopy(tf)
    for view in (ref.student, ref.teacher):
        for op in view.transforms:
            if isinstance(op, T.RandomApply) and isinstance(op.transforms[0], RandomGaussianBlur):
                b = op.transforms[0]
                op.transforms[0] = T.GaussianBlur(b.kernel_size, sigma=b.sigma)
    return ref


def bench_pipeline(args) -> dict:
    """Two-view augmentation throughput of the trainer's own pipeline, one process (one core),
    interleaved with the same pipeline using torchvision's GaussianBlur (median of 5 rounds)."""
    from PIL import Image

    from m2_pretrain.data.augment import TwoViewTransform
    from m2_pretrain.data.embedded import render_sample

    torch.set_num_threads(1)  # (the pipeline's OpenCV blur is single-threaded by augment.py)
    out = {}
    rounds = 5
    for res in (96, 224):
        src = Image.fromarray(render_sample(0, int(res * 1.15))["image"])
        arms = {"pipeline": TwoViewTransform(res)}
        arms["pipeline_torchvision_blur"] = _with_torchvision_blur(arms["pipeline"])
        rates = {k: [] for k in arms}
        for tf in arms.values():
            for _ in range(5):
                tf(src)
        for _ in range(rounds):
            for name, tf in arms.items():
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.pipeline_seconds / rounds:
                    tf(src)
                    n += 1
                rates[name].append(n / (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in rates.items()}
        out[f"{res}px_pairs_per_s_per_core"] = med["pipeline"]
        out[f"{res}px_pairs_per_s_per_core_torchvision_blur"] = med["pipeline_torchvision_blur"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch")
    ap.add_argument("--res", type=int)
    ap.add_argument("--batch", type=int, help="images per view")
    ap.add_argument("--bn-group-size", type=int,
                    help="m2_grouped arm's BN group (default: a quarter of --batch, 32 on CUDA)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--moco", action="store_true", help="add the MoCo v2 arms (shuffle BN vs Momentum BN)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pipeline", action="store_true", help="also measure augmentation throughput")
    ap.add_argument("--pipeline-seconds", type=float, default=5.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.res = args.res or (224 if cuda else 64)
    args.batch = args.batch or (128 if cuda else 16)
    args.bn_group_size = args.bn_group_size or (32 if cuda and args.batch % 32 == 0
                                                else max(args.batch // 4, 2))
    big = args.arch == "resnet50"
    args.proj_hidden, args.proj_out = (4096, 256) if big else (512, 128)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "arch": args.arch, "res": args.res, "batch_per_view": args.batch,
              "bn_group_size": args.bn_group_size,
              "compile": args.compile, "amp": "bf16" if cuda else "fp32",
              "channels_last": cuda, "command": " ".join(sys.argv)}
    result.update(bench_steps(args))
    if args.pipeline:
        result["pipeline"] = bench_pipeline(args)
    print(f"{result['device']}, {args.arch} {args.res}px, {args.batch}/view, "
          f"{'compiled' if args.compile else 'eager'}, {result['amp']}")
    print(f"{'arm':<18}{'median s/step':>14}{'images/s':>10}{'peak GiB':>10}")
    for a, r in result["arms"].items():
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{a:<18}{r['median_s']:>14.4f}{r['images_per_s']:>10.1f}{mem:>10}")
    for k, v in result["ratios"].items():
        print(f"{k:<32}{v:>8.3f}")
    for k, v in result.get("pipeline", {}).items():
        print(f"pipeline {k:<32}{v:>8.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

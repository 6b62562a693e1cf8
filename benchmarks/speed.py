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
  m2_bf16          the m2 step under bf16 autocast on the CPU (train.amp_cpu)   (--cpu-bf16)
  m2_augment       the m2 step after the device-side colour augmentation of device-resident
                   uint8 batches (data.augment_device=cuda without the loader)   (--real)
  mocov2_shuffle   MoCo v2 step, shuffle-BN key encoder        (--moco)
  mocov2_momentum  MoCo v2 step, Momentum BN (alpha 0.064) key  (--moco)
  lightly_byol     the BYOL step built from lightly's modules   (--peer lightly; needs the
                   optional `benchmarks` extra: pip install -e .[benchmarks])

    python benchmarks/speed.py --device cuda --json speed.json          # ResNet-50, 224 px, 128/view
    python benchmarks/speed.py --device cuda --arch resnet18 --res 96 --batch 256
    python benchmarks/speed.py --device cpu --json speed_cpu.json       # small shapes
    python benchmarks/speed.py --device cpu --cpu-bf16                  # + m2 under CPU bf16
    python benchmarks/speed.py --pipeline                               # augmentation pairs/s/core
    python benchmarks/speed.py --real stl10 --arch resnet18 --res 96 --batch 256 --workers 14
    python benchmarks/speed.py --real imagefolder --workers 14          # ResNet-50, 224 px JPEGs

--real runs the trainer's own loop (Trainer.fit) on data it generates (STL10's binary layout
at 96 px; an ImageFolder of about 500x375 JPEGs), and reports images/s, the share of time
spent waiting for data, and images/s as a fraction of two rates measured in the same process:
the m2 step on device-resident batches, and that step after the device-side colour
augmentation of resident uint8 batches (arm m2_augment).

Ratios printed: m2/ceiling, m2/byol_bn, m2_reference/m2, m2_grouped/m2 (and
mocov2_momentum/mocov2_shuffle, m2_bf16/m2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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


class LightlyBYOL(nn.Module):
    """BYOL built from lightly's modules (heads, negative cosine loss, momentum update) on the
    same timm encoder and head widths: the peer arm of the benchmark."""

    def __init__(self, arch: str, proj_hidden: int, proj_out: int, pred_hidden: int) -> None:
        super().__init__()
        import copy

        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum

        self._update_momentum = update_momentum
        self.backbone = create_encoder(arch)
        dim = self.backbone.num_features
        self.projection_head = BYOLProjectionHead(dim, proj_hidden, proj_out)
        self.prediction_head = BYOLPredictionHead(proj_out, pred_hidden, proj_out)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def _online(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def _target(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    def forward(self, v1, v2):
        p1, p2 = self._online(v1), self._online(v2)
        z1, z2 = self._target(v1), self._target(v2)
        return {"loss": 0.5 * (self.criterion(p1, z2) + self.criterion(p2, z1))}

    @torch.no_grad()
    def update_teacher(self, one_minus_m: float) -> None:
        self._update_momentum(self.backbone, self.backbone_momentum, m=1 - one_minus_m)
        self._update_momentum(self.projection_head, self.projection_head_momentum, m=1 - one_minus_m)


ARMS = ("ceiling", "byol_bn", "m2", "m2_reference", "m2_grouped", "m2_bf16", "m2_augment",
        "mocov2_shuffle", "mocov2_momentum", "lightly_byol")


def make_arm(name: str, arch: str, heads: dict, batch: int, bn_group_size: int = 0) -> nn.Module:
    if name == "ceiling":
        return Ceiling(arch)
    if name == "byol_bn":
        return M2Teacher(arch, teacher_norm="bn", **heads)
    if name in ("m2", "m2_bf16", "m2_augment"):
        return M2Teacher(arch, teacher_norm="momentum", **heads)
    if name == "m2_reference":
        return ReferenceM2Teacher(arch, **heads)
    if name == "lightly_byol":
        return LightlyBYOL(arch, **heads)
    if name == "m2_grouped":
        if not bn_group_size or batch % bn_group_size:
            raise ValueError(f"--bn-group-size must divide --batch ({batch}), got {bn_group_size}")
        return M2Teacher(arch, teacher_norm="momentum", student_norm="bn",
                         bn_groups=batch // bn_group_size, **heads)
    if name.startswith("mocov2_"):
        return MoCoV2(arch, queue_size=65536, key_norm="shuffle_bn" if name.endswith("shuffle") else "momentum",
                      shuffle_splits=max(1, min(8, batch // 2)))  # >= 2 images per sub-batch
    raise ValueError(name)


class DeviceAugment:
    """The trainer's device-side colour augmentation on uint8 view batches resident on the
    device (no loader): what ``data.augment_device=cuda`` adds to the m2 step."""

    def __init__(self, res: int, batch: int, device: torch.device, memory_format) -> None:
        from m2_pretrain.data.augment import TwoViewTransform
        from m2_pretrain.data.batch_augment import BatchTwoViewAugment

        tf = TwoViewTransform(res)
        self.aug = BatchTwoViewAugment(tf.student_cfg, tf.teacher_cfg, [0.485, 0.456, 0.406],
                                       [0.229, 0.224, 0.225]).to(device)
        g = torch.Generator().manual_seed(0)
        u8 = [torch.randint(0, 256, (batch, res, res, 3), generator=g, dtype=torch.uint8)
              for _ in range(2)]
        # (B, H, W, 3) -> NCHW view: channels_last, as the loader's batches arrive
        self.views = [u.to(device).permute(0, 3, 1, 2) for u in u8]
        self.memory_format, self.k = memory_format, 0

    def __call__(self):
        from m2_pretrain.data.batch_augment import batch_generator

        self.k += 1
        return self.aug(*self.views, batch_generator(0, 0, self.k), self.memory_format)


class Step:
    """One training step of an arm, as the trainer runs it (``m2_augment``: the m2 step after
    the device-side augmentation of resident uint8 batches)."""

    def __init__(self, name, model, device, amp_dtype, channels_last, compile_, res=0, batch=0):
        self.name, self.model, self.device, self.amp_dtype = name, model.to(device), device, amp_dtype
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.fwd = torch.compile(self.model) if compile_ else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = None if name == "ceiling" else torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        self.augment = None
        if name == "m2_augment":
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self.augment = DeviceAugment(res, batch, device, fmt)
            if compile_:  # as the trainer under train.compile
                self.augment.aug.compile_colour()
        self.k = 0

    def __call__(self, v1, v2):
        if self.augment is not None:
            v1, v2 = self.augment()
        if hasattr(self.model, "set_alpha"):
            self.model.set_alpha(0.5 * (1 + math.cos(self.k / 1000.0)))
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


AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
RATIO_PAIRS = [("m2", "ceiling"), ("m2", "byol_bn"), ("m2_reference", "m2"), ("m2_grouped", "m2"),
               ("mocov2_momentum", "mocov2_shuffle"), ("m2", "lightly_byol"),
               ("byol_bn", "lightly_byol"), ("m2_bf16", "m2"), ("m2_augment", "m2")]


def default_arms(args) -> list[str]:
    """The arms ``bench_steps`` runs without ``--arms``."""
    arms = ["ceiling", "byol_bn", "m2", "m2_reference", "m2_grouped"]
    arms += ["mocov2_shuffle", "mocov2_momentum"] if args.moco else []
    arms += ["lightly_byol"] if args.peer == "lightly" else []
    arms += ["m2_bf16"] if args.cpu_bf16 and args.device != "cuda" else []
    return arms


def _summary(args, times: dict, peak: dict) -> dict:
    """Medians, rates and ratios of the arms timed so far."""
    med = {a: statistics.median(t) for a, t in times.items() if t}
    ratios = {f"{a}/{b}": med[a] / med[b] for a, b in RATIO_PAIRS if a in med and b in med}
    return {
        "arms": {a: {"median_s": med[a], "all_s": times[a], "images_per_s": 2 * args.batch / med[a],
                     "peak_mem_gib": peak[a]} for a in med},
        "ratios": ratios,
    }


def bench_steps(args, arms: list[str] | None = None, on_arm=None) -> dict:
    """Time one training step per arm on device-resident batches.

    Each arm is built, warmed up (compiled) and timed once in turn, then the remaining
    ``repeats - 1`` rounds run interleaved over all arms. ``on_arm(result)`` is called with the
    summary of every arm timed so far after each arm's first round and after each later round
    (``main`` writes ``--json`` there, so a run stopped by a time limit keeps what finished).
    """
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp = AMP[args.amp]
    heads = dict(proj_hidden=args.proj_hidden, proj_out=args.proj_out, pred_hidden=args.proj_hidden)
    arms = arms or args.arms or default_arms(args)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    v1 = torch.randn(args.batch, 3, args.res, args.res, device=device).contiguous(memory_format=fmt)
    v2 = torch.randn(args.batch, 3, args.res, args.res, device=device).contiguous(memory_format=fmt)
    times, peak, steps = {a: [] for a in arms}, {}, {}
    on_arm = on_arm or (lambda result: None)

    def timed(a):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.inner):
            steps[a](v1, v2)
        sync(device)
        times[a].append((time.perf_counter() - t0) / args.inner)

    for a in arms:  # build, warm up (compile), peak memory, first timed round
        steps[a] = Step(a, make_arm(a, args.arch, heads, args.batch, args.bn_group_size), device,
                        torch.bfloat16 if a == "m2_bf16" else amp, args.channels_last,
                        args.compile, args.res, args.batch)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            steps[a](v1, v2)
        sync(device)
        peak[a] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        timed(a)
        on_arm(_summary(args, times, peak))
    for _ in range(args.repeats - 1):  # interleaved
        for a in arms:
            timed(a)
        on_arm(_summary(args, times, peak))
    return _summary(args, times, peak)


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
    """Two-view augmentation throughput, one process (one core), median of 5 interleaved
    rounds: the trainer's per-image PIL pipeline (``data.augment_device=cpu``), the same with
    torchvision's GaussianBlur, the loader-side half of the device pipeline (decode done;
    crop + flip to uint8, ``GeometricTwoView``) and, for reference, the device-side half run
    on this CPU core (batches of 16 pairs)."""
    from PIL import Image

    from m2_pretrain.data.augment import TwoViewTransform
    from m2_pretrain.data.batch_augment import BatchTwoViewAugment, GeometricTwoView
    from m2_pretrain.data.embedded import render_sample

    torch.set_num_threads(1)  # (the pipeline's OpenCV blur is single-threaded by augment.py)
    out = {}
    rounds = 5
    for res in (96, 224):
        arr = render_sample(0, int(res * 1.15))["image"]
        src = Image.fromarray(arr)
        tf = TwoViewTransform(res)
        tv = _with_torchvision_blur(tf)
        geo = GeometricTwoView(res)
        dev = BatchTwoViewAugment(tf.student_cfg, tf.teacher_cfg, [0.5] * 3, [0.25] * 3)
        batch = torch.stack([geo(arr)[0] for _ in range(16)]).permute(0, 3, 1, 2)
        gen = torch.Generator().manual_seed(0)
        if res == 96:  # the whole worker-side sample: memory map, seeding, crop + flip
            import itertools
            import tempfile

            from m2_pretrain.data.datasets import STL10Binary
            from m2_pretrain.data.sampling import SeededSample

            tmpdir = tempfile.TemporaryDirectory(prefix="m2_speed_stl10_")
            write_stl10_layout(Path(tmpdir.name), 256)
            stl = SeededSample(STL10Binary(tmpdir.name, "unlabeled", geo), seed=0)
            keys = itertools.cycle([(i, 0) for i in range(256)])
        arms = {"pipeline": (lambda: tf(src), 1),
                "torchvision_blur": (lambda: tv(src), 1),
                "geometric": (lambda: geo(arr), 1),
                "geometric_from_pil": (lambda: geo(src), 1),
                "device_half_on_cpu": (lambda: dev(batch, batch, gen), 16)}
        if res == 96:
            arms["geometric_stl10_sample"] = (lambda: stl[next(keys)], 1)
        rates = {k: [] for k in arms}
        for fn, _ in arms.values():
            for _ in range(3):
                fn()
        for _ in range(rounds):
            for name, (fn, pairs) in arms.items():
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.pipeline_seconds / rounds / len(arms) * 2:
                    fn()
                    n += pairs
                rates[name].append(n / (time.perf_counter() - t0))
        for k, v in rates.items():
            suffix = "" if k == "pipeline" else "_" + k
            out[f"{res}px_pairs_per_s_per_core{suffix}"] = statistics.median(v)
    return out


# ----------------------------------------------------------------------------- --real
def write_stl10_layout(root: Path, n: int) -> None:
    """``n`` 96 px images (the embedded shapes) in STL10's binary layout as ``unlabeled``."""
    import numpy as np

    from m2_pretrain.data.embedded import render_sample

    d = root / "stl10_binary"
    d.mkdir(parents=True, exist_ok=True)
    imgs = np.stack([render_sample(i, 96)["image"] for i in range(n)])
    imgs.transpose(0, 3, 2, 1).tofile(d / "unlabeled_X.bin")  # column-major, as STL10


def write_jpeg_folder(root: Path, n: int, size=(500, 375)) -> None:
    """``n`` JPEGs of ``size`` (the embedded shapes, resized) in ``root/train/<class>/``."""
    from PIL import Image

    from m2_pretrain.data.embedded import render_sample

    for i in range(n):
        d = root / "train" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(render_sample(i, 128)["image"]).resize(size, Image.BICUBIC)
        img.save(d / f"{i:06d}.jpg", quality=90)


def bench_real(args, kind: str, tmp: Path) -> dict:
    """The trainer's own loop on generated data: images/s, data-wait share, fraction of the
    m2 step rate (same arch, resolution and batch, measured in this process)."""
    from m2_pretrain.config import load_config
    from m2_pretrain.engine.trainer import Trainer

    data_root = tmp / kind
    if kind == "stl10":
        write_stl10_layout(data_root, args.real_images)
        data = ["data.dataset=stl10", "data.split=unlabeled"]
    else:
        write_jpeg_folder(data_root, args.real_images)
        data = ["data.dataset=imagefolder", "data.split=train"]
    batches = args.real_images // args.batch
    if batches < args.real_steps:
        raise SystemExit(f"--real-images {args.real_images} gives {batches} batches of "
                         f"{args.batch}; need at least --real-steps {args.real_steps}")
    log_every = max(args.real_steps // 5, 1)
    cfg = load_config(None, data + [
        f"data.root={data_root}", f"data.res={args.res}", f"data.workers={args.workers}",
        f"data.augment_device={args.augment_device}", f"model.arch={args.arch}",
        f"model.proj_hidden={args.proj_hidden}", f"model.proj_out={args.proj_out}",
        f"model.pred_hidden={args.proj_hidden}", f"train.batch_size={args.batch}",
        f"train.max_steps={args.real_steps}", f"train.log_every={log_every}",
        f"train.device={args.device}", f"train.compile={args.compile}",
        "optim.warmup_epochs=0", f"checkpoint.every_steps={10 ** 9}", "checkpoint.keep_last=1",
    ])
    trainer = Trainer(cfg, tmp / f"out_{kind}", progress=True)
    full = trainer.fit()["history"]
    hist = full[1:]  # the first window holds worker start-up and warm-up
    if not hist:
        raise SystemExit("--real-steps too small: need more than one log window")
    steps = [r["step"] for r in full]
    imgs_per_window = [2 * args.batch * (b - a) for a, b in zip(steps, steps[1:])]
    secs = [n / r["img_per_s"] for n, r in zip(imgs_per_window, hist)]
    ips = sum(imgs_per_window) / sum(secs)
    wait = sum(r["data_wait"] * t for r, t in zip(hist, secs)) / sum(secs)
    arms = bench_steps(args, arms=["m2", "m2_augment"])["arms"]
    step, step_aug = arms["m2"]["images_per_s"], arms["m2_augment"]["images_per_s"]
    return {"dataset": kind, "images": args.real_images, "workers": args.workers,
            "augment_device": trainer.feed.augment_mode, "steps_timed": steps[-1] - steps[0],
            "images_per_s": ips, "data_wait_share": wait,
            "m2_step_images_per_s": step, "fraction_of_m2_step_rate": ips / step,
            "m2_augment_images_per_s": step_aug, "fraction_of_m2_augment_rate": ips / step_aug}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch")
    ap.add_argument("--res", type=int)
    ap.add_argument("--batch", type=int, help="images per view")
    ap.add_argument("--bn-group-size", type=int,
                    help="m2_grouped arm's BN group (default: a quarter of --batch, 32 on CUDA)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--arms", type=lambda s: s.split(","),
                    help="comma-separated arms to run (default: see above)")
    ap.add_argument("--amp", choices=sorted(AMP), help="autocast dtype of the step arms "
                    "(default: bf16 on CUDA, fp32 on the CPU; m2_bf16 is always bf16)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                    help="channels-last models and batches (default: on CUDA)")
    ap.add_argument("--moco", action="store_true", help="add the MoCo v2 arms (shuffle BN vs Momentum BN)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pipeline", action="store_true", help="also measure augmentation throughput")
    ap.add_argument("--pipeline-seconds", type=float, default=5.0)
    ap.add_argument("--peer", choices=["lightly"], help="add a peer library's BYOL step")
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="on CPU, add the m2 step under bf16 autocast (train.amp_cpu)")
    ap.add_argument("--real", help="comma-separated: stl10 (96 px binary layout), imagefolder "
                                   "(~500x375 JPEGs): run the trainer's loop on generated data")
    ap.add_argument("--real-images", type=int, default=0, help="images to generate (default: "
                    "--real-steps + 10 batches: one epoch, no worker restart)")
    ap.add_argument("--real-steps", type=int, default=50, help="optimizer steps per --real run")
    ap.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 2, 1),
                    help="loader workers of the --real runs")
    ap.add_argument("--augment-device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="data.augment_device of the --real runs")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.amp = args.amp or ("bf16" if cuda else "fp32")
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    unknown = sorted(set(args.arms or []) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.res = args.res or (224 if cuda else 64)
    args.batch = args.batch or (128 if cuda else 16)
    args.bn_group_size = args.bn_group_size or (32 if cuda and args.batch % 32 == 0
                                                else max(args.batch // 4, 2))
    big = args.arch == "resnet50"
    args.proj_hidden, args.proj_out = (4096, 256) if big else (512, 128)
    if args.peer == "lightly":
        try:
            import lightly  # noqa: F401
        except ImportError:
            raise SystemExit("--peer lightly: lightly is not installed "
                             "(pip install -e .[benchmarks])") from None
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "arch": args.arch, "res": args.res, "batch_per_view": args.batch,
              "bn_group_size": args.bn_group_size,
              "compile": args.compile, "amp": args.amp,
              "channels_last": args.channels_last, "command": " ".join(sys.argv)}

    def write_json(partial: dict | None = None) -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**result, **(partial or {})}, indent=2))

    if args.real:
        import tempfile

        args.real_images = args.real_images or (args.real_steps + 10) * args.batch
        result["real"] = []
        with tempfile.TemporaryDirectory(prefix="m2_speed_real_") as tmp:
            for kind in args.real.split(","):
                if kind not in ("stl10", "imagefolder"):
                    raise SystemExit(f"--real: unknown dataset {kind!r} (stl10, imagefolder)")
                result["real"].append(bench_real(args, kind, Path(tmp)))
    else:
        result.update(bench_steps(args, on_arm=write_json))
    if args.pipeline:
        result["pipeline"] = bench_pipeline(args)
    print(f"{result['device']}, {args.arch} {args.res}px, {args.batch}/view, "
          f"{'compiled' if args.compile else 'eager'}, {result['amp']}")
    if "arms" in result:
        print(f"{'arm':<18}{'median s/step':>14}{'images/s':>10}{'peak GiB':>10}")
        for a, r in result["arms"].items():
            mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
            print(f"{a:<18}{r['median_s']:>14.4f}{r['images_per_s']:>10.1f}{mem:>10}")
        for k, v in result["ratios"].items():
            print(f"{k:<32}{v:>8.3f}")
    for r in result.get("real", []):
        print(f"real {r['dataset']} ({r['augment_device']} augmentation, {r['workers']} workers): "
              f"{r['images_per_s']:.1f} images/s, data wait {100 * r['data_wait_share']:.1f} %, "
              f"{r['fraction_of_m2_step_rate']:.3f} of the m2 step rate "
              f"({r['m2_step_images_per_s']:.1f} images/s), "
              f"{r['fraction_of_m2_augment_rate']:.3f} of the m2 step + device augmentation "
              f"rate ({r['m2_augment_images_per_s']:.1f} images/s)")
    for k, v in result.get("pipeline", {}).items():
        print(f"pipeline {k:<32}{v:>8.1f}")
    write_json()


if __name__ == "__main__":
    main()

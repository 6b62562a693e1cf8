"""Teacher-target noise: how much the teacher's target for one image moves with its batch-mates.

The paper's argument for Momentum BN (Sec. 3.2): a teacher whose BN statistics come from a
small per-device batch gives noisy targets, because the same image gets a different target
depending on which other images share its batch; Momentum BN mixes in running statistics, so
the noise falls as alpha decays. This benchmark measures that noise directly.

Measure. A fixed pool of two-view images (the training augmentation, drawn once) holds
``probes`` probe images. One *composition draw* puts the probes and random batch-mates from the
rest of the pool into ``batches_per_draw`` global batches, shuffled, and runs the teacher on
each (``M2Teacher.teacher_targets``: the training forward, BN groups laid out as the virtual
devices of ``train.bn_group_size``). The teacher state (weights, running statistics, alpha) is
the same for every draw: the lazy Momentum BN update of a draw is undone before the next. Only
the batch-mates change. For every probe image and view, over ``draws`` draws:

  z' noise   = 1 - mean cosine between the projections z' the image gets in two different
               draws (all pairs; unbiased for any number of draws). It is the noise of the
               normalised target the loss sees; about twice "1 - cosine to the image's mean
               target". A predictor that ignores batch-mates cannot bring that view's loss term
               below 2 - 2 sqrt(1 - noise) (~ the noise): ``loss_floor`` sums this over the two
               views, the scale of the symmetrised training loss.
  z' rel var = E||z' - mean z'||^2 / E||z'||^2 (unnormalised projection).
  h noise, h rel var: the same for the pooled encoder features h.

Reported: the mean over probe images and views; mean and std over ``--seeds`` seeds of the
composition draw.

Rows (same weights, same global batch ``--batch``): BN over groups of g (``teacher_norm=bn``
with ``bn_group_size=g``), SyncBN (whole-batch statistics), Momentum BN over groups of g at
fixed alphas, eval-mode BN (running statistics only: the floor, exactly 0). The running
statistics of eval BN and Momentum BN are the network's population statistics, recounted on
the pool with ``recount_bn_statistics``. Networks: the teacher of a short BN / Momentum BN run
(groups of 8) at ``--snapshots`` steps, step 0 being the untrained network with the paper's
init (``model.zero_init_last=false``).

Link to training: a BN/BN and a BN/Momentum BN run at groups of 8 (global batch ``--batch``,
same seed) through the project's ``Trainer``; every ``--noise-every`` steps the noise of the
teacher as it is at that step (its own norm, running statistics and alpha_k of the cosine
schedule) is logged next to the training loss.

Budgets (``--budget``):
  cpu (default): timm's ``test_resnet`` at 32 px on Fashion-MNIST, 2 x 100 steps; 8.2 CPU-min
      (one compute thread and one loader worker), so within 10 minutes on 2 idle cores.
  gpu: ResNet-18 at 64 px, 2 x 1000 steps, larger pool and more draws; sized for 8 minutes on
      one H100/H200 (an estimate).

    python benchmarks/target_noise.py                  # CPU budget
    python benchmarks/target_noise.py --budget gpu     # one H100/H200

Writes ``--out`` (default benchmarks/results/): target_noise.json (every measurement, the
command, settings, shape checks), target_noise_table.md, target_noise.png (noise vs group size)
and target_noise_training.png (noise and loss along the two runs). Existing results are kept
unless ``--force``. Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (Debian) or
``--root``; ``--dataset embedded`` needs no download.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2_pretrain.config import Config, load_config  # noqa: E402
from m2_pretrain.data.augment import Normalizer  # noqa: E402
from m2_pretrain.data.datasets import FASHION_MNIST_DEFAULT_ROOT, build_dataset  # noqa: E402
from m2_pretrain.data.sampling import SeededSample, collate_pairs  # noqa: E402
from m2_pretrain.engine.hooks import PeriodicHook  # noqa: E402
from m2_pretrain.engine.trainer import Trainer  # noqa: E402
from m2_pretrain.models.build import build_augmentation, build_model  # noqa: E402
from m2_pretrain.eval.protocols import recount_bn_statistics  # noqa: E402
from m2_pretrain.layers import apply_norm  # noqa: E402
from m2_pretrain.models import M2Teacher  # noqa: E402
from m2_pretrain.models.schedules import momentum_bn_alpha  # noqa: E402

METRICS = ("z_noise", "z_relvar", "h_noise", "h_relvar", "loss_floor")
BUDGETS = {
    # 8.2 CPU-min with one compute thread and one loader worker (benchmarks/README.md)
    "cpu": dict(arch="test_resnet", res=32, steps=100, noise_every=10, snapshots=[0, 50, 100],
                pool=4096, probes=128, batches_per_draw=2, draws=3, seeds=3, workers=1,
                warmup_steps=8, device="cpu", alphas=[0.5, 0.1, 0.01]),
    # ResNet-18, 64 px; not run yet: the size is an estimate for 8 min on one H100/H200
    "gpu": dict(arch="resnet18", res=64, steps=1000, noise_every=100,
                snapshots=[0, 200, 1000], pool=16384, probes=512, batches_per_draw=4, draws=6,
                seeds=3, workers=8, warmup_steps=50, device="cuda",
                alphas=[1.0, 0.5, 0.1, 0.01, 0.0]),
}
RUN_ARMS = {"bn/bn": "bn", "bn/momentum": "momentum"}  # student BN / teacher norm


# ----------------------------------------------------------------------------- the pool
@dataclass
class ViewPool:
    """Two fixed augmented views per image (uint8, (P, 3, H, W)); images ``[0, probes)`` are
    the probes, the others only ever batch-mates."""

    v1: torch.Tensor
    v2: torch.Tensor
    probes: int
    normalizer: torch.nn.Module

    def __post_init__(self) -> None:
        if not 0 < self.probes < len(self.v1):
            raise ValueError(f"probes must be in (0, {len(self.v1)}), got {self.probes}")

    def __len__(self) -> int:
        return len(self.v1)


def build_pool(cfg: Config, size: int, probes: int, seed: int = 10_000,
               workers: int = 0) -> ViewPool:
    """``size`` images of ``cfg.data``'s training split (a fixed random subset), each with one
    view pair from the training augmentation (``build_augmentation``), keyed by ``seed``."""
    base = build_dataset(cfg.data, cfg.data.split, build_augmentation(cfg))
    if size > len(base):
        raise ValueError(f"--pool {size} is larger than the dataset ({len(base)} images)")
    idx = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))[:size]
    keys = [(int(i), 0) for i in idx]
    loader = DataLoader(SeededSample(base, seed), batch_size=256, num_workers=workers,
                        collate_fn=collate_pairs, sampler=keys)
    v1, v2 = zip(*loader)
    return ViewPool(torch.cat(v1), torch.cat(v2), probes,
                    Normalizer(cfg.data.mean, cfg.data.std))


def compositions(pool: ViewPool, batch: int, batches_per_draw: int,
                 generator: torch.Generator) -> torch.Tensor:
    """One draw: pool indices ``(batches_per_draw, batch)`` holding every probe once and random
    batch-mates from the rest of the pool, in a random order."""
    n = batch * batches_per_draw
    if n > len(pool) or n <= pool.probes:
        raise ValueError(f"a draw of {batches_per_draw} x {batch} images needs more than "
                         f"{pool.probes} probes and at most {len(pool)} pool images")
    mates = pool.probes + torch.randperm(len(pool) - pool.probes, generator=generator)
    idx = torch.cat([torch.arange(pool.probes), mates[: n - pool.probes]])
    return idx[torch.randperm(n, generator=generator)].view(batches_per_draw, batch)


# ----------------------------------------------------------------------------- the measure
def pairwise_noise(t: torch.Tensor) -> torch.Tensor:
    """``1 - mean_{r != s} cos(t_r, t_s)`` per item, for targets ``t`` of shape (draws, N, d)."""
    d = t.shape[0]
    if d < 2:
        raise ValueError("the noise needs at least 2 draws")
    u = F.normalize(t.double(), dim=-1)
    s = u.sum(0)
    return 1.0 - ((s * s).sum(-1) - d) / (d * (d - 1))


def relative_variance(t: torch.Tensor) -> torch.Tensor:
    """``E||t - E t||^2 / E||t||^2`` per item (unbiased variance over draws), t (draws, N, d)."""
    t = t.double()
    var = t.var(0, correction=1).sum(-1)
    return var / t.square().sum(-1).mean(0).clamp_min(1e-30)


def summarise_targets(z: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
    """The reported numbers from targets z (draws, N, 2, dz) and features h (draws, N, 2, dh)."""
    zn = pairwise_noise(z.flatten(1, 2)).view(z.shape[1], 2)
    floor = (2 - 2 * (1 - zn).clamp_min(0).sqrt()).sum(1)  # both views of an image
    return {"z_noise": zn.mean().item(),
            "z_relvar": relative_variance(z.flatten(1, 2)).mean().item(),
            "h_noise": pairwise_noise(h.flatten(1, 2)).mean().item(),
            "h_relvar": relative_variance(h.flatten(1, 2)).mean().item(),
            "loss_floor": floor.mean().item()}


@torch.no_grad()
def collect_targets(model: M2Teacher, pool: ViewPool, batch: int, batches_per_draw: int,
                    draws: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher projections z' and pooled features h of every probe and view in ``draws``
    composition draws: tensors (draws, probes, 2, d).

    The teacher runs as it is (train or eval mode, its norm and alpha), through
    ``model.teacher_targets``; its state is restored after every global batch, so each draw
    sees the same teacher and ``model`` is left as it was.
    """
    teacher = model.teacher
    saved = {k: v.clone() for k, v in teacher.state_dict().items()}
    feats: list[torch.Tensor] = []
    hook = teacher.encoder.register_forward_hook(lambda m, i, o: feats.append(o))
    g = torch.Generator().manual_seed(seed)
    norm = pool.normalizer.to(device)
    zs, hs = [], []
    try:
        for _ in range(draws):
            z_d = h_d = None
            for idx in compositions(pool, batch, batches_per_draw, g):
                feats.clear()
                z1, z2 = model.teacher_targets(norm(pool.v1[idx].to(device)),
                                               norm(pool.v2[idx].to(device)))
                h = torch.cat(feats)  # [view 1; view 2] for one call or two
                teacher.load_state_dict(saved)
                probe = idx < pool.probes
                pos, who = probe.nonzero().squeeze(1), idx[probe]
                if z_d is None:
                    z_d = z1.new_zeros(pool.probes, 2, z1.shape[1])
                    h_d = h.new_zeros(pool.probes, 2, h.shape[1])
                z_d[who, 0], z_d[who, 1] = z1[pos].float(), z2[pos].float()
                h_d[who, 0], h_d[who, 1] = h[pos].float(), h[batch + pos].float()
            zs.append(z_d.cpu())
            hs.append(h_d.cpu())
    finally:
        hook.remove()
    return torch.stack(zs), torch.stack(hs)


def measure(model: M2Teacher, pool: ViewPool, batch: int, batches_per_draw: int, draws: int,
            seeds: list[int], device) -> dict:
    """:func:`summarise_targets` for each composition seed, plus mean and std over seeds."""
    per_seed = [summarise_targets(*collect_targets(model, pool, batch, batches_per_draw, draws,
                                                   s, device)) for s in seeds]
    out = {"seeds": per_seed}
    for k in METRICS:
        vals = [r[k] for r in per_seed]
        out[k] = {"mean": statistics.mean(vals),
                  "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


# ----------------------------------------------------------------------------- teachers
@dataclass(frozen=True)
class Row:
    """One teacher normalisation: ``norm`` over groups of ``group`` images (``alpha`` for
    Momentum BN), in train mode or, for the floor, eval mode."""

    key: str
    label: str
    norm: str
    group: int
    alpha: Optional[float] = None
    mode: str = "train"


def table_rows(groups: list[int], alphas: list[float], batch: int,
               check_group: int) -> list[Row]:
    """BN and Momentum BN (``alphas``) over ``groups``, SyncBN, eval BN; Momentum BN at alpha 1
    (= BN) and 0 (= eval BN) over ``check_group`` when ``alphas`` leaves them out."""
    rows = [Row(f"bn@{g}", f"BN, groups of {g}", "bn", g) for g in groups]
    rows.append(Row("sync", f"SyncBN (whole batch of {batch})", "sync", batch))
    grid = [(a, g) for a in alphas for g in groups]
    grid += [(a, check_group) for a in (1.0, 0.0) if (a, check_group) not in grid]
    rows += [Row(f"momentum@{g},a={a:g}", f"Momentum BN a={a:g}, groups of {g}", "momentum", g, a)
             for a, g in sorted(grid, key=lambda ag: (-ag[0], ag[1]))]
    rows.append(Row("eval", "eval-mode BN (running statistics)", "bn", batch, mode="eval"))
    return rows


def plain_teacher(cfg: Config, teacher_state: Optional[dict] = None) -> M2Teacher:
    """An M2Teacher whose teacher has plain BN layers, with the weights of ``teacher_state``
    (a teacher state dict of any norm; per-group running statistics keep group 0's)."""
    c = copy.deepcopy(cfg)
    c.model.teacher_norm, c.train.bn_group_size = "sync", 0  # one process: plain BN
    model = build_model(c)
    if teacher_state is not None:
        state = {k: (v[0] if k.endswith(("running_mean", "running_var")) and v.dim() == 2 else v)
                 for k, v in teacher_state.items() if not k.endswith("alpha")}
        model.teacher.load_state_dict(state)
    return model


def recount_population_statistics(model: M2Teacher, pool: ViewPool, batch: int, device) -> int:
    """Running statistics of the plain teacher := exact averages over the pool's views
    (both views, global batches of ``batch``), via the evaluation code's recount."""
    x = torch.cat([pool.v1, pool.v2])
    loader = DataLoader(list(zip(x, torch.zeros(len(x)))), batch_size=batch, drop_last=True)
    return recount_bn_statistics(model.teacher, loader, pool.normalizer.to(device), device)


def row_teacher(plain: M2Teacher, row: Row, batch: int) -> M2Teacher:
    """A copy of ``plain`` whose teacher uses ``row``'s norm, converted by ``apply_norm`` as
    ``M2Teacher`` converts its own teacher (running statistics copied to every group)."""
    if batch % row.group:
        raise ValueError(f"global batch {batch} is not divisible into groups of {row.group}")
    model = copy.deepcopy(plain)
    apply_norm(model.teacher, row.norm, num_groups=batch // row.group, num_views=2,
               alpha=1.0 if row.alpha is None else row.alpha)
    model.teacher_norm = row.norm
    model.teacher.train(row.mode == "train")
    return model


# ----------------------------------------------------------------------------- the runs
def run_config(args, teacher_norm: str) -> Config:
    """A short pretraining run: BN student, ``teacher_norm`` teacher, groups of 8."""
    steps_per_epoch = args.dataset_size // args.batch
    data = (["data.dataset=fashion_mnist", f"data.root={args.root}",
             "data.mean=[0.286,0.286,0.286]", "data.std=[0.353,0.353,0.353]"]
            if args.dataset == "fashion_mnist" else
            ["data.dataset=embedded", f"data.num_images={args.dataset_size}",
             "data.embedded_palette=two_tone"])
    return load_config(None, data + [
        f"model.arch={args.arch}", "model.proj_hidden=512", "model.proj_out=128",
        "model.pred_hidden=512", "model.student_norm=bn", f"model.teacher_norm={teacher_norm}",
        "model.zero_init_last=false", "data.split=train", f"data.res={args.res}",
        f"data.workers={args.workers}", f"data.crop_scale_min={args.crop_min}",
        f"optim.base_lr={args.lr}", "optim.lr_reference_batch=256", "optim.weight_decay=1e-4",
        f"optim.warmup_epochs={args.warmup_steps / steps_per_epoch}",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
        f"train.bn_group_size={args.run_group}", f"train.seed={args.seed}",
        f"train.m_base={args.m_base}", f"train.device={args.device}",
        f"train.log_every={args.noise_every}", f"checkpoint.every_steps={args.steps}",
        "checkpoint.keep_last=1",
    ])


class NoiseRecorder:
    """The target noise of a run's teacher every ``every`` steps (and at step 0), and the
    teacher's state at ``snapshot_steps``, as a trainer hook.

    The noise is measured on a copy of the model whose alpha is the schedule's value for the
    next step (the teacher that step's targets come from); the run itself is not touched.
    Hand :attr:`hook` to the trainer and call :meth:`record` once before ``fit()``.
    """

    def __init__(self, probe: Callable[[M2Teacher], dict], every: int, snapshot_steps=()) -> None:
        self.probe, self.snapshot_steps = probe, set(snapshot_steps)
        self.hook = PeriodicHook("target_noise", every, self.record)
        self.noise: list[dict] = []
        self.snapshots: dict[int, dict] = {}

    def record(self, tr: Trainer) -> None:
        model = copy.deepcopy(tr.model)
        alpha = momentum_bn_alpha(tr.step, tr.total_steps, tr.cfg.model.alpha_base)
        model.set_alpha(alpha)
        self.noise.append({"step": tr.step, "alpha": alpha if tr.cfg.model.teacher_norm ==
                           "momentum" else None, **self.probe(model)})
        if tr.step in self.snapshot_steps:
            self.snapshots[tr.step] = {k: v.detach().cpu().clone()
                                       for k, v in model.teacher.state_dict().items()}


def noise_run(cfg: Config, output_dir, recorder: NoiseRecorder, **kwargs) -> dict:
    """``Trainer(cfg, output_dir, **kwargs).fit()`` with ``recorder`` measuring along it."""
    tr = Trainer(cfg, output_dir, hooks=[recorder.hook], **kwargs)
    recorder.record(tr)
    return tr.fit()


# ----------------------------------------------------------------------------- driver
def loglog_slope(xs: list[float], ys: list[float]) -> Optional[float]:
    """Least-squares slope of log y on log x (None with fewer than 2 positive points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.mean(p[0] for p in pts)
    my = statistics.mean(p[1] for p in pts)
    return (sum((p[0] - mx) * (p[1] - my) for p in pts)
            / sum((p[0] - mx) ** 2 for p in pts))


def shape_checks(table: list[dict], groups: list[int], batch: int) -> dict:
    """The expected shape, read off the measurements of each network: log-log slopes of the
    z' / h noise against g (BN) and alpha (Momentum BN, 0 < alpha < 1, per g), SyncBN over BN at
    the whole batch, Momentum BN at alpha 1 over BN, and the largest |noise| of the floor rows
    (eval BN, Momentum BN at alpha 0)."""
    out = {}
    for net in sorted({r["step"] for r in table}):
        rows = {r["key"]: r for r in table if r["step"] == net and r["mode"] in ("train", "eval")}
        zn = {k: r["z_noise"]["mean"] for k, r in rows.items()}
        mom = [r for r in rows.values() if r["norm"] == "momentum" and r["alpha"] is not None
               and not r["key"].endswith(",own")]
        alpha_slopes = {}
        for g in groups:
            pts = sorted((r["alpha"], r["z_noise"]["mean"]) for r in mom
                         if r["group"] == g and 0 < r["alpha"] < 1)
            if len(pts) >= 2:
                alpha_slopes[str(g)] = loglog_slope([p[0] for p in pts], [p[1] for p in pts])
        floor = [abs(zn[r["key"]]) for r in mom if r["alpha"] == 0] + [abs(zn["eval"])]
        out[str(net)] = {
            "bn_z_noise_vs_group_slope": loglog_slope(groups, [zn[f"bn@{g}"] for g in groups]),
            "bn_h_noise_vs_group_slope": loglog_slope(
                groups, [rows[f"bn@{g}"]["h_noise"]["mean"] for g in groups]),
            "momentum_z_noise_vs_alpha_slope": alpha_slopes,
            "sync_over_bn_at_batch": (zn["sync"] / zn[f"bn@{batch}"] if zn.get(f"bn@{batch}")
                                      else None),
            "momentum_a1_over_bn": {str(r["group"]): zn[r["key"]] / zn[f"bn@{r['group']}"]
                                    for r in mom if r["alpha"] == 1
                                    and zn.get(f"bn@{r['group']}")},
            "max_abs_floor_z_noise": max(floor),
        }
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--arch")
    ap.add_argument("--res", type=int)
    ap.add_argument("--steps", type=int, help="optimizer steps of each of the two runs")
    ap.add_argument("--noise-every", type=int, help="noise logging period along the runs")
    ap.add_argument("--snapshots", type=int, nargs="+",
                    help="steps of the Momentum BN run whose teacher the table measures")
    ap.add_argument("--pool", type=int, help="pool images (probes + batch-mates)")
    ap.add_argument("--probes", type=int)
    ap.add_argument("--batches-per-draw", type=int)
    ap.add_argument("--draws", type=int, help="composition draws per measurement")
    ap.add_argument("--seeds", type=int, help="seeds of the composition draw")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--device")
    ap.add_argument("--batch", type=int, default=256, help="global batch per view")
    ap.add_argument("--groups", type=int, nargs="+", default=[8, 16, 32, 64, 256],
                    help="BN group sizes of the table")
    ap.add_argument("--alphas", type=float, nargs="+",
                    help="Momentum BN alphas over every group size (alpha 1 and 0 are always "
                         "measured at --run-group)")
    ap.add_argument("--run-group", type=int, default=8, help="BN group size of the two runs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the two runs")
    ap.add_argument("--lr", type=float, default=0.4, help="SGD lr per 256 images")
    ap.add_argument("--m-base", type=float, default=0.01)
    ap.add_argument("--crop-min", type=float, default=0.2)
    ap.add_argument("--dataset", choices=("fashion_mnist", "embedded"), default="fashion_mnist")
    ap.add_argument("--dataset-size", type=int,
                    help="images of the embedded dataset (Fashion-MNIST: 60000)")
    ap.add_argument("--root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--work", default="output/target_noise", help="scratch for the two runs")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default="target_noise", help="prefix of the result files")
    ap.add_argument("--force", action="store_true", help="overwrite existing result files")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--replot", metavar="JSON",
                    help="only rewrite the table and figures from an earlier target_noise.json")
    args = ap.parse_args(argv)
    for k, v in BUDGETS[args.budget].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.dataset_size is None:
        args.dataset_size = 60000 if args.dataset == "fashion_mnist" else 8192
    bad = [g for g in args.groups + [args.run_group] if args.batch % g]
    if bad:
        ap.error(f"--batch {args.batch} is not divisible by the group sizes {bad}")
    if not set(args.snapshots) <= set(range(0, args.steps + 1)):
        ap.error(f"--snapshots must be steps in [0, {args.steps}]")
    if args.draws < 2:
        ap.error("--draws must be at least 2")
    return args


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the loader workers)."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def result_paths(args) -> dict[str, Path]:
    out = Path(args.out)
    return {"json": out / f"{args.name}.json", "md": out / f"{args.name}_table.md",
            "png": out / f"{args.name}.png", "png_runs": out / f"{args.name}_training.png"}


def main(argv=None) -> dict:
    args = parse(argv)
    paths = result_paths(args)
    existing = [str(p) for p in paths.values() if p.exists()]
    if args.replot:
        existing = [p for p in existing if p != str(paths["json"])]
    if existing and not args.force:
        sys.exit(f"error: {', '.join(existing)} exist; pass --force to overwrite or --out/--name")
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        Path(args.out).mkdir(parents=True, exist_ok=True)
        paths["md"].write_text(markdown(result) + "\n")
        plot(result, paths)
        return result
    device = torch.device(args.device)
    t0, cpu0 = time.time(), cpu_seconds()
    seeds = list(range(args.seeds))
    cfgs = {arm: run_config(args, norm) for arm, norm in RUN_ARMS.items()}
    pool = build_pool(cfgs["bn/momentum"], args.pool, args.probes, workers=args.workers)
    log = (lambda *a: print(*a, flush=True))
    log(f"pool: {len(pool)} images x 2 views, {pool.probes} probes ({time.time() - t0:.0f} s)")
    probe = lambda model: measure(model, pool, args.batch, args.batches_per_draw,  # noqa: E731
                                  args.draws, seeds, device)

    # 1. the two runs, noise logged along them
    runs, snapshots = {}, {}
    for arm, cfg in cfgs.items():
        work = Path(args.work) / arm.replace("/", "-")
        shutil.rmtree(work, ignore_errors=True)  # the benchmark's own scratch
        snaps = args.snapshots if RUN_ARMS[arm] == "momentum" else ()
        rec = NoiseRecorder(probe, args.noise_every, snaps)
        res = noise_run(cfg, work, rec, progress=args.progress)
        loss = {h["step"]: h["loss"] for h in res["history"] if "loss" in h}
        runs[f"{arm}@{args.run_group}"] = [{**n, "loss": loss.get(n["step"])} for n in rec.noise]
        snapshots.update(rec.snapshots)
        for n in runs[f"{arm}@{args.run_group}"]:
            log(f"{arm:>14} step {n['step']:4d}: z' noise {n['z_noise']['mean']:.2e} "
                f"floor {n['loss_floor']['mean']:.3f} loss {n['loss'] or float('nan'):.3f}")
        log(f"{arm} done ({time.time() - t0:.0f} s)")

    # 2. the table: every row on the same weights (the Momentum BN run's teacher at each snapshot)
    rows = table_rows(args.groups, args.alphas, args.batch, args.run_group)
    table = []
    for step in args.snapshots:
        plain = plain_teacher(cfgs["bn/momentum"], snapshots[step]).to(device)
        recount_population_statistics(plain, pool, args.batch, device)
        for row in rows:
            r = measure(row_teacher(plain, row, args.batch), pool, args.batch,
                        args.batches_per_draw, args.draws, seeds, device)
            table.append({"step": step, **asdict(row), **r})
            log(f"step {step:4d} {row.key:>22}: z' noise {r['z_noise']['mean']:.3e} "
                f"± {r['z_noise']['std']:.1e}, h noise {r['h_noise']['mean']:.3e}")
        own = next(n for n in runs[f"bn/momentum@{args.run_group}"] if n["step"] == step)
        table.append({"step": step, **asdict(Row(
            f"momentum@{args.run_group},own", "Momentum BN as trained (each group's own running "
            "statistics, alpha of the schedule)", "momentum", args.run_group, own["alpha"])),
            **{k: own[k] for k in ("seeds",) + METRICS}})
        log(f"table at step {step} done ({time.time() - t0:.0f} s)")

    wall, cpu = time.time() - t0, cpu_seconds() - cpu0
    cli = sys.argv[1:] if argv is None else list(argv)
    meta = {"command": " ".join(["python", "benchmarks/target_noise.py"] + cli),
            **{k: getattr(args, k) for k in (
                "budget", "arch", "res", "steps", "noise_every", "snapshots", "pool", "probes",
                "batches_per_draw", "draws", "seeds", "batch", "groups", "alphas", "run_group",
                "seed", "lr", "m_base", "crop_min", "warmup_steps", "dataset", "device")},
            "torch": torch.__version__, "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1), "cpu_count": os.cpu_count()}
    result = {"meta": meta, "table": table, "runs": runs,
              "checks": shape_checks(table, args.groups, args.batch)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["md"].write_text(markdown(result) + "\n")
    print(markdown(result))
    plot(result, paths)
    return result


# ----------------------------------------------------------------------------- report
def _cell(s: dict, digits: int = 2) -> str:
    return f"{s['mean']:.{digits}e} ± {s['std']:.0e}"


def markdown(result: dict) -> str:
    m, table = result["meta"], result["table"]
    steps = m["snapshots"]
    head = "| teacher norm | " + " | ".join(f"z' noise, step {s}" for s in steps) + \
        " | " + " | ".join(f"h noise, step {s}" for s in steps) + " |"
    lines = [
        f"Target noise (1 - mean pairwise cosine over {m['draws']} composition draws; mean ± std "
        f"over {m['seeds']} seeds of the draw), {m['dataset']}, {m['arch']} at {m['res']} px, "
        f"global batch {m['batch']} per view, {m['probes']} probe images x 2 views. Networks: "
        f"the BN / Momentum BN run's teacher (groups of {m['run_group']}) at steps "
        f"{', '.join(map(str, steps))} (step 0: untrained, paper init).", "",
        head, "|---" * (1 + 2 * len(steps)) + "|"]
    by = {(r["step"], r["key"]): r for r in table}
    for key in dict.fromkeys(r["key"] for r in table):
        label = next(r["label"] for r in table if r["key"] == key)
        cells = [_cell(by[(s, key)]["z_noise"]) for s in steps]
        cells += [_cell(by[(s, key)]["h_noise"]) for s in steps]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Along the runs (teacher as it is at that step; loss = mean training loss over "
              "the preceding steps; floor = loss floor implied by the z' noise):", "",
              "| run | step | alpha | z' noise | h noise | floor | loss |",
              "|---|---|---|---|---|---|---|"]
    for arm, curve in result["runs"].items():
        for n in curve:
            a = "–" if n["alpha"] is None else f"{n['alpha']:.3f}"
            loss = "–" if n["loss"] is None else f"{n['loss']:.3f}"
            lines.append(f"| {arm} | {n['step']} | {a} | {_cell(n['z_noise'])} | "
                         f"{_cell(n['h_noise'])} | {n['loss_floor']['mean']:.3f} | {loss} |")
    lines += ["", f"Command: `{m['command']}` ({m['wall_seconds'] / 60:.1f} min wall, "
              f"{m['cpu_seconds'] / 60:.1f} CPU-min (process and loader workers), {m['device']}, "
              f"{m['cpu_count']} cores)."]
    return "\n".join(lines)


def plot(result: dict, paths: dict[str, Path]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    m, table = result["meta"], result["table"]
    steps, groups = m["snapshots"], m["groups"]
    alphas = [a for a in m["alphas"] if 0 < a < 1]
    fig, axes = plt.subplots(2, len(steps), figsize=(4.4 * len(steps), 8.2), squeeze=False,
                             sharey="row")
    by = {(r["step"], r["key"]): r for r in table}
    colours = plt.cm.viridis([0.15, 0.45, 0.75, 0.95])
    for j, step in enumerate(steps):
        for i, (metric, name) in enumerate((("z_noise", "z' (projection)"),
                                            ("h_noise", "h (pooled features)"))):
            ax = axes[i][j]

            def series(key_of):
                ys = [by[(step, key_of(g))][metric] for g in groups]
                return [y["mean"] for y in ys], [y["std"] for y in ys]

            y, e = series(lambda g: f"bn@{g}")
            ax.errorbar(groups, y, e, color="black", marker="o", lw=2, capsize=3,
                        label="BN (= Momentum BN a=1)")
            for a, c in zip(alphas, colours):
                y, e = series(lambda g, a=a: f"momentum@{g},a={a:g}")
                ax.errorbar(groups, y, e, color=c, marker="s", ms=4, capsize=3,
                            label=f"Momentum BN a={a:g}")
            s = by[(step, "sync")][metric]
            ax.errorbar([m["batch"]], [s["mean"]], [s["std"]], color="red", marker="*", ms=12,
                        ls="none", label=f"SyncBN ({m['batch']})")
            ref = by[(step, f"bn@{groups[0]}")][metric]["mean"]
            ax.plot(groups, [ref * groups[0] / g for g in groups], color="grey", ls=":",
                    label="∝ 1/g")
            own = by.get((step, f"momentum@{m['run_group']},own"))
            if own is not None:
                ax.errorbar([m["run_group"]], [max(own[metric]["mean"], 1e-12)],
                            [own[metric]["std"]], color="tab:red", marker="D", ms=7, ls="none",
                            label="Momentum BN as trained: own per-group running statistics, "
                                  "a of the schedule")
            floor = max(abs(r[metric]["mean"]) for r in table if r["step"] == step and (
                r["mode"] == "eval" or (r["norm"] == "momentum" and r["alpha"] == 0
                                        and not r["key"].endswith(",own"))))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(groups, [str(g) for g in groups])
            ax.set_xlabel("BN group size g (images)")
            if j == 0:
                ax.set_ylabel(f"{name} noise: 1 - mean cos")
            title = "untrained (paper init)" if step == 0 else f"teacher at step {step}"
            if own is not None:
                title += f" (schedule a={own['alpha']:.2g})"
            ax.set_title(f"{title}\neval BN, Momentum BN a=0: |noise| ≤ {floor:.0e}", fontsize=9)
            ax.grid(True, which="both", alpha=0.25)
    fig.suptitle(f"Teacher-target noise over batch compositions ({m['dataset']}, {m['arch']} "
                 f"{m['res']} px, global batch {m['batch']}; mean ± std over {m['seeds']} seeds)",
                 fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"bn/bn": ("black", "BN / BN"), "bn/momentum": ("tab:blue", "BN / Momentum BN")}
    for arm, curve in result["runs"].items():
        c, lab = styles.get(arm.split("@")[0], ("grey", arm))
        lab = f"{lab}, groups of {m['run_group']}"
        st = [n["step"] for n in curve]
        ax1.errorbar(st, [max(n["z_noise"]["mean"], 1e-12) for n in curve],
                     [n["z_noise"]["std"] for n in curve], color=c, marker="o", ms=3, capsize=2,
                     label=lab)
        pts = [(n["step"], n["loss"]) for n in curve if n["loss"] is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker="o", ms=3,
                 label=f"{lab}: training loss")
        ax2.plot(st, [n["loss_floor"]["mean"] for n in curve], color=c, ls="--",
                 label=f"{lab}: floor from z' noise")
    mom = next((c for a, c in result["runs"].items() if a.startswith("bn/momentum")), None)
    if mom:
        tw = ax1.twinx()
        tw.plot([n["step"] for n in mom], [n["alpha"] for n in mom], color="tab:blue", ls=":",
                alpha=0.6)
        tw.set_ylabel("Momentum BN alpha (dotted)", color="tab:blue")
        tw.set_ylim(0, 1.05)
    ax1.set_yscale("log")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("z' noise of the teacher as it is (1 - mean cos)")
    ax1.set_title("target noise along the runs (Momentum BN: alpha cosine 1 → 0)", fontsize=9)
    ax1.grid(True, which="both", alpha=0.25)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("symmetrised BYOL loss")
    ax2.set_title("training loss; dashed: the floor for a predictor blind to batch-mates",
                  fontsize=9)
    ax2.grid(True, alpha=0.25)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{m['dataset']}, {m['arch']} {m['res']} px, global batch {m['batch']}, seed "
                 f"{m['seed']}, {m['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["png_runs"], dpi=110)
    plt.close(fig)
    print(f"wrote {paths['png']} and {paths['png_runs']}")


if __name__ == "__main__":
    main()

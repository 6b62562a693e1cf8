"""Learning-quality benchmark: the paper's Table 1 (and Table 4) in miniature, on Fashion-MNIST.

The paper's gain lives where each GPU normalises a small batch while the optimiser averages
the gradients of all GPUs. One process reproduces that regime with virtual devices
(``train.bn_group_size``): a global batch of 256 images per view, split into BN groups of 32
(8 "devices"), the rows differing only in where BN statistics come from:

  SyncBN/SyncBN, BN/SyncBN, SyncBN/BN, BN/BN, BN/Momentum BN, SyncBN/Momentum BN  (Table 1)
  BN/BN and BN/Momentum BN at groups of 16 and 64                                    (Table 4)

Every arm has the same budget (optimizer steps, global batch, schedules, seeds). Scores, on
fixed subsets of Fashion-MNIST train (features/probe training) and test: weighted kNN
(k=200, T=0.1) and a linear probe (BN without affine + linear, SGD, precomputed features) of
the *exported* teacher (``m2-pretrain export``: group 0's BN statistics, as rank 0 would save),
both as exported and after recounting its BN statistics on training images (so a BN
calibration difference is not read as a feature difference); plus the kNN monitor along the
run (teacher, eval mode) as a curve per arm.

Budgets (``--budget``):
  cpu (default): ``test_resnet`` (timm's 0.4M-parameter ResNet) at 32 px, the 7 Table-1/4 arms
      listed by ``--arms`` default, 3 seeds, 80 steps, about 20 minutes on a 2-core machine.
  gpu: ResNet-18 (the paper's encoder) at 64 px, all 10 arms x 3 seeds as parallel processes,
      sized to finish within 10 minutes on one H100/H200 (an estimate; see benchmarks/README.md).

Encoder/resolution: 28 px Fashion-MNIST through an ImageNet stem (stride 4) leaves 7x7 maps
after the stem and 1x1 in the last stage. The GPU budget upsamples to 64 px in the crop
(16, 8, 4, 2 px maps in the four stages, like a CIFAR ResNet at 32 px) and keeps the stock
timm ResNet-18, so the export loads into ``timm.create_model('resnet18')`` unchanged. The CPU
budget cannot afford that (ResNet-18 at 64 px: ~5 s per forward+backward of 256 images on
2 cores); it uses 32 px (8, 4, 2, 1) and a tiny ResNet.

    python benchmarks/learning_quality.py                       # CPU budget
    python benchmarks/learning_quality.py --budget gpu          # GPU budget (one H100/H200)

Writes ``--out`` (default benchmarks/results/): learning_quality.json (raw runs, curves,
command, settings), learning_quality.md (the table beside the paper's) and learning_quality.png.
Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (Debian) or ``--root`` with idx files.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2_pretrain.config import load_config  # noqa: E402
from m2_pretrain.data.augment import Normalizer, eval_transform  # noqa: E402
from m2_pretrain.data.datasets import FASHION_MNIST_DEFAULT_ROOT, build_dataset  # noqa: E402
from m2_pretrain.checkpoint import list_checkpoints  # noqa: E402
from m2_pretrain.config import encoder_kwargs  # noqa: E402
from m2_pretrain.engine.hooks import PeriodicHook  # noqa: E402
from m2_pretrain.engine.trainer import Trainer  # noqa: E402
from m2_pretrain.eval.common import load_encoder  # noqa: E402
from m2_pretrain.eval.knn import knn_accuracy  # noqa: E402
from m2_pretrain.eval.protocols import (  # noqa: E402
    linear_head,
    raw_features,
    recount_bn_statistics,
    train_linear_head,
)
from m2_pretrain.export import export_encoder  # noqa: E402
from m2_pretrain.models.encoder import create_encoder  # noqa: E402

# Fashion-MNIST: training images, and the normalisation every run and score uses
FMNIST_TRAIN_IMAGES = 60000
FMNIST_MEAN, FMNIST_STD = [0.286] * 3, [0.353] * 3
FMNIST_CLASSES = 10
# scores: weighted kNN (k, temperature), as the toolkit's kNN monitor
KNN_K, KNN_T = 200, 0.1

# arm name -> (student norm, teacher norm, BN group size; 0 = no training)
ARMS = {
    "random": ("-", "-", 0),
    "sync/sync": ("sync", "sync", 32),
    "bn/sync": ("bn", "sync", 32),
    "sync/bn": ("sync", "bn", 32),
    "bn/bn": ("bn", "bn", 32),
    "bn/momentum": ("bn", "momentum", 32),
    "sync/momentum": ("sync", "momentum", 32),
    "bn/bn@16": ("bn", "bn", 16),
    "bn/momentum@16": ("bn", "momentum", 16),
    "bn/bn@64": ("bn", "bn", 64),
    "bn/momentum@64": ("bn", "momentum", 64),
}
LABEL = {"random": "random init", "sync": "SyncBN", "bn": "BN", "momentum": "Momentum BN"}
# Paper: Table 1 (STL10, ResNet-18, 400 epochs, 32 images per GPU per view, linear top-1) and
# Table 4 (ImageNet, ResNet-50, 300 epochs, linear top-1 by per-GPU batch; BYOL = BN/BN).
PAPER = {
    "sync/sync": "88.06 (T1)", "bn/sync": "87.80 (T1)", "sync/bn": "87.12 (T1)",
    "bn/bn": "84.16 (T1)", "bn/momentum": "88.18 (T1)", "sync/momentum": "88.25 (T1)",
    "bn/momentum@16": "68.3 (T4)", "bn/bn@64": "59.7 (T4)", "bn/momentum@64": "72.6 (T4)",
    "bn/bn@16": "– (T4: BYOL not run below 64)",
}
BUDGETS = {
    # 20 steps took 6.0 min on 2 idle cores (24 runs); 80 steps are sized for ~20 min (benchmarks/README.md)
    "cpu": dict(arch="test_resnet", res=32, steps=80, monitor_every=10, seeds=3, jobs=1,
                warmup_steps=8, workers=1,
                arms=["random", "sync/sync", "bn/bn", "bn/momentum", "bn/bn@16",
                      "bn/momentum@16", "bn/bn@64", "bn/momentum@64"],
                eval_train=2000, eval_test=2000, recount_images=1024, monitor_train=1000,
                monitor_test=1000, device="cpu"),
    # 33 runs as 3 waves of 11 processes; sized by the CPU augmentation (~16k views/s on 16
    # cores at 64 px, not the GPU): ~300 steps x 512 views per run and wave in ~2.5 min
    "gpu": dict(arch="resnet18", res=64, steps=300, monitor_every=50, seeds=3, jobs=11,
                warmup_steps=30, monitor_train=2000, monitor_test=2000,
                workers=1, arms=list(ARMS), eval_train=10000, eval_test=10000,
                recount_images=10240, device="cuda"),
}


def arm_label(arm: str) -> str:
    s, t, g = ARMS[arm]
    return LABEL["random"] if arm == "random" else f"{LABEL[s]} / {LABEL[t]}, groups of {g}"


# ----------------------------------------------------------------------------- evaluation
_EVAL_CACHE: dict = {}


def eval_tensors(args, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of a fixed permutation of ``split``, eval transform, uint8."""
    key = (split, n, args.res)
    if key not in _EVAL_CACHE:
        cfg = load_config(None, ["data.dataset=fashion_mnist", f"data.root={args.root}"])
        ds = build_dataset(cfg.data, split, eval_transform(args.res))
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
        xs, ys = zip(*(ds[i] for i in idx))
        _EVAL_CACHE[key] = (torch.stack(xs), torch.as_tensor(ys).long())
    return _EVAL_CACHE[key]


def features(encoder: nn.Module, x: torch.Tensor, device, bs: int = 512) -> torch.Tensor:
    """Pooled features of the uint8 images ``x`` (eval mode), the toolkit's ``raw_features``."""
    encoder.eval()
    norm = Normalizer(FMNIST_MEAN, FMNIST_STD).to(device)
    ds = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    return raw_features(encoder, ds, norm, device, bs)[0]


def linear_probe(ftr, ltr, fte, lte, epochs: int, lr_per_256: float = 0.5, bs: int = 256,
                 seed: int = 0) -> float:
    """The toolkit's linear protocol (``m2_pretrain.eval.protocols``: BN without affine ->
    linear, SGD 0.9, no wd, cosine lr) on precomputed features, seeded. Returns test top-1 (%)."""
    g = torch.Generator().manual_seed(seed)
    head = linear_head(ftr.shape[1], FMNIST_CLASSES, generator=g)
    loader = DataLoader(TensorDataset(ftr, ltr), batch_size=bs, shuffle=True, drop_last=True,
                        generator=g)
    train_linear_head(head, loader, lambda x: x, epochs * len(loader), lr_per_256 * bs / 256,
                      torch.device("cpu"))
    with torch.no_grad():
        return 100.0 * (head(fte).argmax(1) == lte).float().mean().item()


def score(args, encoder: nn.Module, device) -> dict:
    """kNN and linear probe (test subset) of ``encoder`` as it is."""
    xtr, ltr = eval_tensors(args, "train", args.eval_train)
    xte, lte = eval_tensors(args, "test", args.eval_test)
    ftr, fte = features(encoder, xtr, device), features(encoder, xte, device)
    knn = knn_accuracy(F.normalize(ftr, dim=1), ltr, F.normalize(fte, dim=1), lte, FMNIST_CLASSES,
                       KNN_K, KNN_T)
    return {"knn": knn["top1"], "linear": linear_probe(ftr, ltr, fte, lte, args.probe_epochs)}


def recount(args, encoder: nn.Module, device) -> int:
    """Recount BN statistics on ``recount_images`` training images (exact averages over
    batches of 256, the per-view global batch)."""
    norm = Normalizer(FMNIST_MEAN, FMNIST_STD).to(device)
    x, y = eval_tensors(args, "train", max(args.recount_images, args.eval_train))
    loader = DataLoader(TensorDataset(x[-args.recount_images:], y[-args.recount_images:]),
                        batch_size=256)
    return recount_bn_statistics(encoder, loader, norm, device)


# ----------------------------------------------------------------------------- one run
def knn_curve_hook(args, curve: list) -> PeriodicHook:
    """Trainer hook: every ``--monitor-every`` steps, the teacher's kNN top-1 on the benchmark's
    cached subsets, appended to ``curve`` as ``(step, top1)``."""

    def knn(trainer) -> dict[str, float]:
        enc = trainer.model.teacher.encoder
        was = enc.training
        xtr, ltr = eval_tensors(args, "train", args.monitor_train)
        xte, lte = eval_tensors(args, "test", args.monitor_test)
        ftr = F.normalize(features(enc, xtr, trainer.device), dim=1)
        fte = F.normalize(features(enc, xte, trainer.device), dim=1)
        enc.train(was)
        out = knn_accuracy(ftr, ltr, fte, lte, FMNIST_CLASSES, KNN_K, KNN_T)
        curve.append((trainer.step, out["top1"]))
        return {"top1": out["top1"], "top5": out["top5"]}

    return PeriodicHook("knn", args.monitor_every, knn)


def init_overrides(args) -> list[str]:
    """``--init torchvision`` (default): each residual block's last BN weight starts at 1, as
    in the paper's torchvision ResNets; ``timm``: timm's zero init of that weight, with which a
    short run leaves the residual branches all but off (0.0003-0.0009 after 20 CPU steps)."""
    return [] if args.init == "timm" else ["model.zero_init_last=false"]


def arm_config(args, arm: str, seed: int):
    s_norm, t_norm, group = ARMS[arm]
    batch = args.global_batch
    steps_per_epoch = FMNIST_TRAIN_IMAGES // batch
    overrides = [
        f"model.arch={args.arch}", "model.proj_hidden=512", "model.proj_out=128",
        "model.pred_hidden=512", f"model.student_norm={s_norm}", f"model.teacher_norm={t_norm}",
        "data.dataset=fashion_mnist", f"data.root={args.root}", "data.split=train",
        f"data.res={args.res}", f"data.workers={args.workers}",
        f"data.crop_scale_min={args.crop_min}",
        f"data.mean={FMNIST_MEAN}", f"data.std={FMNIST_STD}",
        "data.knn_train_split=train", "data.knn_test_split=test",
        f"optim.base_lr={args.lr}", "optim.lr_reference_batch=256", "optim.weight_decay=1e-4",
        f"optim.warmup_epochs={args.warmup_steps / steps_per_epoch}",
        f"train.max_steps={args.steps}", f"train.batch_size={batch}",
        f"train.bn_group_size={group}", f"train.seed={seed}",
        f"train.m_base={args.m_base}", f"train.device={args.device}",
        f"train.log_every={args.monitor_every}",
        f"checkpoint.every_steps={args.steps}", "checkpoint.keep_last=1",
    ] + init_overrides(args)
    return load_config(None, overrides)


def run_arm(args, arm: str, seed: int) -> dict:
    device = torch.device(args.device)
    t0 = time.time()
    row = {"arm": arm, "seed": seed, "student_norm": ARMS[arm][0], "teacher_norm": ARMS[arm][1],
           "bn_group_size": ARMS[arm][2]}
    if arm == "random":
        torch.manual_seed(seed)
        init = encoder_kwargs(load_config(None, init_overrides(args)))  # as the trained arms
        enc = create_encoder(args.arch, **init).to(device)
        row["curve"], row["final_loss"], row["epochs"] = [], None, 0.0
    else:
        cfg = arm_config(args, arm, seed)
        work = Path(args.work) / f"{arm.replace('/', '-')}_s{seed}"
        shutil.rmtree(work, ignore_errors=True)  # the benchmark's own scratch: train afresh
        curve: list = []
        trainer = Trainer(cfg, work, progress=args.progress, hooks=[knn_curve_hook(args, curve)])
        result = trainer.fit()
        ckpt = list_checkpoints(work)[-1]
        meta = export_encoder(ckpt, work / "teacher.pth")  # group 0's statistics
        enc, _ = load_encoder(work / "teacher.pth")  # stock timm model, strict load
        enc = enc.to(device)
        row.update(curve=curve, final_loss=result["history"][-1]["loss"],
                   epochs=args.steps * args.global_batch / FMNIST_TRAIN_IMAGES,
                   bn_statistics=meta.get("bn_statistics", "single device"))
    row["exported"] = score(args, enc, device)
    row["bn_layers_recounted"] = recount(args, enc, device)
    row["recounted"] = score(args, enc, device)
    row["seconds"] = round(time.time() - t0, 1)
    return row


# ----------------------------------------------------------------------------- report
def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        d = out.setdefault(r["arm"], {})
        for kind in ("exported", "recounted"):
            for metric in ("knn", "linear"):
                d.setdefault(f"{metric}_{kind}", []).append(r[kind][metric])
    return {arm: {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                      "n": len(v)} for k, v in d.items()} for arm, d in out.items()}


def _cpu_seconds() -> float:
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def write_report(args, rows: list[dict], out: Path, wall: float) -> None:
    summ = summarise(rows)
    out.mkdir(parents=True, exist_ok=True)
    epochs = args.steps * args.global_batch / FMNIST_TRAIN_IMAGES
    meta = {"command": " ".join(["python", "benchmarks/learning_quality.py"] + sys.argv[1:]),
            "budget": args.budget, "arch": args.arch, "res": args.res, "steps": args.steps,
            "global_batch_per_view": args.global_batch, "epochs": epochs, "seeds": args.seeds,
            "lr_per_256": args.lr, "m_base": args.m_base, "warmup_steps": args.warmup_steps,
            "init": args.init, "eval_train_images": args.eval_train, "eval_test_images": args.eval_test,
            "recount_images": args.recount_images, "probe_epochs": args.probe_epochs,
            "device": args.device, "torch": torch.__version__, "wall_seconds": round(wall, 1),
            # CPU time of this process and its children (all runs): on a loaded machine,
            # cpu_seconds / cores estimates the wall time on an idle one
            "cpu_seconds": round(getattr(args, "cpu_seconds", None) or _cpu_seconds(), 1),
            "cpu_count": os.cpu_count()}
    if getattr(args, "commands", None):
        meta["command"] = " && ".join(args.commands)
    (out / "learning_quality.json").write_text(
        json.dumps({"meta": meta, "runs": rows, "summary": summ}, indent=2))
    cell = lambda s: f"{s['mean']:.1f} ± {s['std']:.1f}"  # noqa: E731
    lines = [
        f"Fashion-MNIST, {args.arch} ({args.init} init) at {args.res} px, {args.steps} steps x "
        f"{args.global_batch} "
        f"images per view ({epochs:.2f} epochs), mean ± std over the seeds listed; "
        f"scores of the exported teacher (group 0's BN statistics) on {args.eval_test} test images "
        f"(kNN / probe trained on {args.eval_train} train images); 'recounted' = BN statistics "
        f"recounted on {args.recount_images} train images.",
        "",
        "| student / teacher BN, group | seeds | kNN exported | kNN recounted | linear exported "
        "| linear recounted | paper top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    seeds_of = {arm: sorted(r["seed"] for r in rows if r["arm"] == arm) for arm in summ}
    for arm in ARMS:
        if arm in summ:
            s = summ[arm]
            lines.append(f"| {arm_label(arm)} | {','.join(map(str, seeds_of[arm]))} "
                         f"| {cell(s['knn_exported'])} "
                         f"| {cell(s['knn_recounted'])} "
                         f"| {cell(s['linear_exported'])} | {cell(s['linear_recounted'])} "
                         f"| {PAPER.get(arm, '–')} |")
    lines += ["", "Paper: T1 = Table 1 (STL10, ResNet-18, 400 epochs, 32 images per GPU); "
              "T4 = Table 4 (ImageNet, ResNet-50, 300 epochs, linear top-1 by per-GPU batch).",
              f"Command: `{meta['command']}` ({wall / 60:.1f} min wall, "
              f"{meta['cpu_seconds'] / 60:.1f} CPU-min on {args.device}, {os.cpu_count()} cores)."]
    (out / "learning_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args, rows, summ, out)


def plot(args, rows, summ, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    arms = [a for a in ARMS if a in summ and a != "random"]
    for arm in arms:
        curves = [r["curve"] for r in rows if r["arm"] == arm and r["curve"]]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        n = min(len(c) for c in curves)
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(n)]
        ax1.plot(steps[:n], mean, marker="o", ms=3, label=arm_label(arm),
                 ls="-" if ARMS[arm][2] == 32 else "--")
    if "random" in summ:
        ax1.axhline(summ["random"]["knn_exported"]["mean"], color="grey", lw=0.8,
                    label="random init")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("kNN top-1 (%), teacher, eval mode")
    ax1.set_title("kNN monitor (mean over seeds)", fontsize=9)
    ax1.legend(fontsize=6)
    keys = [("knn_exported", "kNN exported"), ("knn_recounted", "kNN recounted"),
            ("linear_exported", "linear exported"), ("linear_recounted", "linear recounted")]
    all_arms = [a for a in ARMS if a in summ]
    width = 0.8 / len(keys)
    for i, (k, lab) in enumerate(keys):
        xs = [j + (i - 1.5) * width for j in range(len(all_arms))]
        ax2.bar(xs, [summ[a][k]["mean"] for a in all_arms], width,
                yerr=[summ[a][k]["std"] for a in all_arms], capsize=2, label=lab)
    ax2.set_xticks(range(len(all_arms)), [a for a in all_arms], rotation=40, ha="right", fontsize=7)
    lo = min(summ[a][k]["mean"] for a in all_arms for k, _ in keys)
    ax2.set_ylim(max(lo - 10, 0), 100)
    epochs = args.steps * args.global_batch / FMNIST_TRAIN_IMAGES
    ns = sorted({summ[a]["knn_exported"]["n"] for a in all_arms})
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    ax2.set_title(f"exported teacher, {args.steps} steps ({epochs:.2f} "
                  f"epochs), {seeds} seeds", fontsize=9)
    ax2.legend(fontsize=6)
    fig.suptitle(f"Table 1/4 in miniature: Fashion-MNIST, {args.arch} {args.res} px, global batch "
                 f"{args.global_batch} ({args.device})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "learning_quality.png", dpi=120)
    print(f"wrote {out / 'learning_quality.png'}")


# ----------------------------------------------------------------------------- driver
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: the budget's")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (budget's default)")
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. +seeds-1")
    ap.add_argument("--arch")
    ap.add_argument("--res", type=int)
    ap.add_argument("--monitor-every", type=int, help="kNN monitor period in steps")
    ap.add_argument("--jobs", type=int, help="runs in parallel (separate processes)")
    ap.add_argument("--device")
    ap.add_argument("--workers", type=int, help="DataLoader workers per run")
    ap.add_argument("--eval-train", type=int)
    ap.add_argument("--eval-test", type=int)
    ap.add_argument("--recount-images", type=int)
    ap.add_argument("--monitor-train", type=int)
    ap.add_argument("--monitor-test", type=int)
    ap.add_argument("--probe-epochs", type=int, default=30)
    ap.add_argument("--global-batch", type=int, default=256, help="images per view per step")
    ap.add_argument("--lr", type=float, default=0.4, help="SGD lr per 256 images")
    ap.add_argument("--m-base", type=float, default=0.01, help="initial 1 - m of the EMA")
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--crop-min", type=float, default=0.2)
    ap.add_argument("--init", choices=("torchvision", "timm"), default="torchvision",
                    help="encoder init: torchvision's (last BN weight of each block 1, the "
                         "paper's) or timm's (0); random init uses the same")
    ap.add_argument("--root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--work", default="output/learning_quality")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only write the report from the runs of earlier learning_quality.json "
                    "(or partial_results.json) files; their commands, CPU and wall times add up")
    args = ap.parse_args(argv)
    for k, v in BUDGETS[args.budget].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


def run_all(args, runs: list[tuple[str, int]], on_row) -> list[dict]:
    """Every ``(arm, seed)`` run, ``args.jobs`` at a time in separate processes (one in this
    process for ``--jobs 1``); ``on_row(row)`` after each."""
    rows: list[dict] = []
    if args.jobs <= 1:
        for arm, seed in runs:
            rows.append(run_arm(args, arm, seed))
            on_row(rows[-1])
        return rows
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(run_arm, args, arm, seed) for arm, seed in runs]
        for f in as_completed(futures):
            rows.append(f.result())
            on_row(rows[-1])
    return rows


def merge(args) -> None:
    """The report from earlier runs (e.g. the Table 1 rows and the Table 4 sweep run as two
    invocations)."""
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    # partial_results.json (a list of runs, written after each run) counts as well
    parts = [p if isinstance(p, dict) else
             {"runs": p, "meta": {"command": "(stopped early)", "wall_seconds": 0.0}}
             for p in parts]
    rows = [r for part in parts for r in part["runs"]]
    args.commands = [part["meta"]["command"] for part in parts]
    args.cpu_seconds = sum(part["meta"].get("cpu_seconds", 0.0) for part in parts)
    write_report(args, rows, Path(args.out), sum(part["meta"]["wall_seconds"] for part in parts))


def main(argv=None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.merge:
        merge(args)
        return
    t0 = time.time()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = [(arm, seed) for seed in seeds for arm in args.arms]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    bar = tqdm(total=len(runs), desc="runs", dynamic_ncols=True)
    done: list[dict] = []

    def on_row(r: dict) -> None:
        done.append(r)
        bar.write(f"{r['arm']:>15} seed {r['seed']}: kNN {r['exported']['knn']:.1f} / recounted "
                  f"{r['recounted']['knn']:.1f}, linear {r['exported']['linear']:.1f} / "
                  f"{r['recounted']['linear']:.1f} ({r['seconds']:.0f} s)")
        bar.update(1)
        (work / "partial_results.json").write_text(json.dumps(done, indent=2))

    rows = run_all(args, runs, on_row)
    bar.close()
    write_report(args, rows, Path(args.out), time.time() - t0)


if __name__ == "__main__":
    main()

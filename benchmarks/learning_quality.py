"""Learning-quality benchmark: "Table 1 / Table 4 in miniature" on Fashion-MNIST.

Arms, each with the same budget (optimizer steps, per-step batch per view):
  * ``m2``      — Momentum² Teacher (teacher with Momentum BN),
  * ``byol_bn`` — BYOL with a plain-BN teacher (per-view train-mode BN),
  * ``random``  — the same encoder at random initialisation (no training).
Score: weighted kNN top-1 (k=200, T=0.1) of the exported *teacher* encoder, trained on a
10k-image subset of the training split and tested on the 10k test images. Over several seeds
and per-step batches (16 and 32: the paper's small-batch regime). Not a test: it takes time.

    python benchmarks/learning_quality.py                       # default CPU budget (< 30 min)
    python benchmarks/learning_quality.py --steps 5000 --seeds 5 --device cuda   # a long run

Writes ``--out`` (default benchmarks/results/): learning_quality.json, .md and .png.
Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (Debian) or ``--root`` with idx files.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2_pretrain.config import load_config  # noqa: E402
from m2_pretrain.data.datasets import FASHION_MNIST_DEFAULT_ROOT  # noqa: E402
from m2_pretrain.engine.trainer import Trainer  # noqa: E402
from m2_pretrain.eval.knn import knn_eval_encoder  # noqa: E402

ARMS = ("random", "byol_bn", "m2")
ARM_LABEL = {"random": "random init", "byol_bn": "BYOL, BN teacher", "m2": "M2 Teacher (Momentum BN)"}


def arm_config(args, arm: str, batch: int, seed: int):
    overrides = [
        f"model.arch={args.arch}", "model.proj_hidden=512", "model.proj_out=128",
        "model.pred_hidden=512", f"model.teacher_norm={'bn' if arm == 'byol_bn' else 'momentum'}",
        "data.dataset=fashion_mnist", f"data.root={args.root}", "data.split=train",
        f"data.res={args.res}", f"data.workers={args.workers}", f"data.crop_scale_min={args.crop_min}",
        "data.mean=[0.286,0.286,0.286]", "data.std=[0.353,0.353,0.353]",
        "data.knn_train_split=train", "data.knn_test_split=test",
        "knn.k=200", "knn.temperature=0.1", f"knn.max_train={args.knn_train}",
        f"optim.base_lr={args.lr}", "optim.lr_reference_batch=256", "optim.weight_decay=1e-4",
        f"optim.warmup_epochs={args.warmup_steps / max(60000 // batch, 1)}",
        f"train.max_steps={args.steps}", f"train.batch_size={batch}", f"train.seed={seed}",
        f"train.m_base={args.m_base}", f"train.device={args.device}",
        f"train.log_every={max(args.steps // 10, 1)}",
        f"checkpoint.every_steps={args.steps}", "checkpoint.keep_last=1",
    ]
    return load_config(None, overrides)


def run_arm(args, arm: str, batch: int, seed: int) -> dict:
    cfg = arm_config(args, arm, batch, seed)
    device = torch.device(args.device)
    t0 = time.time()
    if arm == "random":
        torch.manual_seed(seed)
        enc = timm.create_model(args.arch, num_classes=0, pretrained=False)
        loss = None
    else:
        run_dir = Path(args.work) / f"{arm}_b{batch}_s{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own scratch: train afresh
        trainer = Trainer(cfg, run_dir, progress=args.progress)
        result = trainer.fit()
        enc = trainer.model.teacher.encoder  # what `m2-pretrain export` writes (eval-mode BN)
        loss = result["history"][-1]["loss"]
    knn = knn_eval_encoder(enc, cfg.data, cfg.knn, device)
    return {"arm": arm, "batch": batch, "seed": seed, "top1": knn["top1"], "top5": knn["top5"],
            "final_loss": loss, "seconds": round(time.time() - t0, 1)}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        out.setdefault(f"{r['arm']}@{r['batch']}", []).append(r["top1"])
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "n": len(v)} for k, v in out.items()}


def write_report(args, rows: list[dict], out: Path) -> None:
    summ = summarise(rows)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "steps": args.steps, "arch": args.arch, "res": args.res,
            "lr_per_256": args.lr, "m_base": args.m_base, "device": args.device,
            "torch": torch.__version__}
    (out / "learning_quality.json").write_text(json.dumps({"meta": meta, "runs": rows, "summary": summ}, indent=2))
    lines = [f"kNN top-1 (%) on Fashion-MNIST test, mean ± std over {args.seeds} seeds, "
             f"{args.steps} steps, {args.arch} at {args.res} px",
             "", "| arm | " + " | ".join(f"batch {b}" for b in args.batches) + " |",
             "|---|" + "---|" * len(args.batches)]
    for arm in ARMS:
        cells = []
        for b in args.batches:
            s = summ.get(f"{arm}@{b}")
            cells.append(f"{s['mean']:.1f} ± {s['std']:.1f}" if s else "–")
        lines.append(f"| {ARM_LABEL[arm]} | " + " | ".join(cells) + " |")
    (out / "learning_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(ARMS)
    for i, arm in enumerate(ARMS):
        means = [summ.get(f"{arm}@{b}", {}).get("mean", 0) for b in args.batches]
        stds = [summ.get(f"{arm}@{b}", {}).get("std", 0) for b in args.batches]
        xs = [j + (i - (len(ARMS) - 1) / 2) * width for j in range(len(args.batches))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=ARM_LABEL[arm])
        for x, m in zip(xs, means):
            ax.text(x, m + 0.5, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(args.batches)), [f"batch {b} per step" for b in args.batches])
    ax.set_ylabel("kNN top-1 (%)")
    lo = min(r["top1"] for r in rows)
    ax.set_ylim(max(lo - 10, 0), 100)
    ax.set_title(f"Fashion-MNIST, {args.steps} steps, {args.seeds} seeds ({args.device})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "learning_quality.png", dpi=120)
    print(f"wrote {out / 'learning_quality.png'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", "--budget", type=int, default=200, help="optimizer steps per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.4, help="SGD lr per 256 images (linear scaling)")
    ap.add_argument("--m-base", type=float, default=0.01, help="initial 1 - m of the EMA")
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--crop-min", type=float, default=0.2)
    ap.add_argument("--knn-train", type=int, default=10000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--work", default="output/learning_quality")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for batch in args.batches:
        for seed in range(args.seeds):
            for arm in ARMS:
                r = run_arm(args, arm, batch, seed)
                rows.append(r)
                print(f"{arm:>8} batch {batch:>3} seed {seed}: kNN top-1 {r['top1']:.2f} "
                      f"top-5 {r['top5']:.2f} ({r['seconds']:.0f} s)", flush=True)
                write_report_quiet(args, rows)
    write_report(args, rows, Path(args.out))


def write_report_quiet(args, rows):
    """Keep partial results on disk (no lost work if the run is stopped)."""
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partial_results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

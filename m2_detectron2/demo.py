"""`make demo`: the whole chain on the embedded default dataset, no download.

1. pretrain a ResNet-18 with Momentum² Teacher on the embedded shapes (48 px) and report its
   kNN accuracy next to the same network untrained, with the paper's init;
2. export the teacher encoder and convert it (and the untrained one) to Detectron2 weights,
   checking the converted ResNet against timm's numerically (``--verify``);
3. fine-tune Mask R-CNN R18-FPN on the embedded shapes in COCO format (mosaics of 4 shapes,
   exact masks) for a short schedule from each, and print COCO box/mask AP side by side,
   judged against the spread between detector seeds.

``--budget quick`` (the default on CPU) pretrains 240 steps: enough to run the chain, not to
beat the untrained network. ``--budget full`` pretrains 3000 steps (bf16 on CPUs that support
it); ``auto`` picks ``full`` on CUDA. Results go to ``<output>/results.json`` and a picture of
them to ``<output>/summary.png``; Detectron2's metrics, events, predictions and checkpoints to
``<output>/det_pretrained`` and ``<output>/det_untrained``. ``--seed`` seeds pretraining and
both detectors (the generated data are the same for every seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from m2_pretrain import demo as pretrain_demo
from m2_pretrain.engine.run_dir import RunDirError

from .convert import convert_file, verify
from .data import read_image
from .demo_plot import plot_summary
from .train import Trainer, build_config

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIGS = {"quick": REPO / "configs" / "pretrain" / "embedded_cpu.yaml",
                    "full": REPO / "configs" / "pretrain" / "embedded_cpu_full.yaml"}
DET_CONFIG = REPO / "configs" / "detectron2" / "demo_shapes_mask_rcnn_R18.yaml"
TEACHER_ARM = "M2 Teacher (converted)"
UNTRAINED_ARM = "untrained, paper init (converted)"

PANEL_IMAGES = 3  # validation images drawn with each detector's top detections in summary.png
PANEL_TOP = 4  # detections drawn per image (the highest-scoring ones)

# Spread of the demo detector's AP between detector seeds (max - min over seeds 0, 1, 2, the
# larger of the two arms), measured once with the demo's detector config; a difference between
# the arms no larger than this is reported as no difference. How it was measured:
# benchmarks/README.md, "Demo detector: spread between seeds".
DET_SEED_SPREAD = {"bbox": 5.4, "segm": 2.0}
KNN_TARGET = 5.0  # kNN points over the untrained network that count as pretraining helping


def resolve_budget(budget: str) -> str:
    """``auto`` is ``full`` on CUDA and ``quick`` on CPU."""
    if budget not in ("auto", "quick", "full"):
        raise ValueError(f"budget must be auto, quick or full, got {budget!r}")
    if budget == "auto":
        return "full" if torch.cuda.is_available() else "quick"
    return budget


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def budget_overrides(budget: str) -> list[str]:
    """Pretraining overrides a budget adds: bf16 autocast for ``full`` on a CPU with bf16."""
    if budget == "full" and not torch.cuda.is_available() and cpu_has_bf16():
        return ["train.amp_cpu=true"]
    return []


def default_output_dir(budget: str, seed: int) -> str:
    """``demo_output``, ``demo_output/full``, ``demo_output/seed1``, ``demo_output/full/seed1``."""
    parts = ["demo_output"] + (["full"] if budget == "full" else []) + (
        [f"seed{seed}"] if seed else [])
    return "/".join(parts)


def judge(diff: float, spread: float) -> str:
    """A difference between two detectors in words, against the detector-seed spread."""
    if not math.isfinite(diff):
        return "not comparable (COCO AP is NaN when a detector predicts nothing)"
    if abs(diff) <= spread:
        return f"no difference (inside the detector-seed spread of {spread:.1f})"
    return f"{'ahead' if diff > 0 else 'behind'} by more than the detector-seed spread ({spread:.1f})"


def findings(summary: dict) -> list[str]:
    """What this run shows and what it does not, in words, from its own numbers."""
    knn = summary["pretrain"]["knn"]
    (t_name, t), (u_name, u) = list(knn.items())[:2]
    d_knn = t["top1"] - u["top1"]
    steps = summary["pretrain"]["steps"]
    lines = [f"kNN: teacher {t['top1']:.1f} vs {u_name} {u['top1']:.1f} ({d_knn:+.1f}) after "
             f"{steps} pretraining steps."]
    if d_knn >= KNN_TARGET:
        lines.append(f"Shown: the teacher's features beat the untrained network's by "
                     f"{KNN_TARGET:g}+ kNN points on these images.")
    else:
        lines.append(f"Not shown: {steps} steps do not beat the untrained network's features by "
                     f"{KNN_TARGET:g} kNN points"
                     + (" (`make demo DEMO_BUDGET=full` pretrains 3000 steps)."
                        if summary.get("budget") == "quick" else "."))
    det = summary["detection"]
    if TEACHER_ARM in det and UNTRAINED_ARM in det:
        for key, label in (("bbox", "box AP"), ("segm", "mask AP")):
            a, b = det[TEACHER_ARM][key]["AP"], det[UNTRAINED_ARM][key]["AP"]
            lines.append(f"{label}: teacher {a:.1f} vs untrained {b:.1f} ({a - b:+.1f}): "
                         f"{judge(a - b, DET_SEED_SPREAD[key])}.")
    lines.append("Shown either way: the chain runs end to end and the conversion is exact "
                 f"(--verify max abs diff {summary['convert']['verify_max_abs_diff']:.1e}).")
    return lines


def finetune(weights: str, out_dir: Path, opts: list[str]) -> tuple[dict, list[dict], list]:
    """Train and evaluate the demo detector; returns its AP, its ``PANEL_TOP`` best detections
    on the first ``PANEL_IMAGES`` validation images (``boxes``, ``masks``, ``classes``,
    ``scores``) and the class names. ``SEED`` in ``opts`` seeds it."""
    init = ["MODEL.WEIGHTS", weights]
    if not weights:
        init += ["M2.RANDOM_INIT", "True"]
    cfg = build_config(str(DET_CONFIG), init + ["OUTPUT_DIR", str(out_dir)] + opts)
    cfg.freeze()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # head init, sampler order (TrainingSampler draws its seed from numpy), loader worker seeds
    # (drawn from torch) and augmentation all follow from here, as train_net.py's
    # default_setup does with SEED
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    res = trainer._last_eval_results
    model = trainer.model.eval()
    preds = []
    with torch.no_grad():
        for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[:PANEL_IMAGES]:
            img = read_image(d["file_name"], format=cfg.INPUT.FORMAT)
            inst = model([{"image": torch.as_tensor(img.transpose(2, 0, 1).copy()),
                           "height": d["height"], "width": d["width"]}])[0]["instances"].to("cpu")
            top = inst.scores.argsort(descending=True)[:PANEL_TOP]
            inst = inst[top]
            preds.append({"file_name": d["file_name"], "image_id": d["image_id"],
                          "boxes": inst.pred_boxes.tensor.numpy(),
                          "masks": inst.pred_masks.numpy().astype(bool),
                          "classes": inst.pred_classes.numpy(), "scores": inst.scores.numpy()})
    return ({"seconds": round(time.time() - t0, 1),
             "bbox": {k: res["bbox"][k] for k in ("AP", "AP50", "AP75")},
             "segm": {k: res["segm"][k] for k in ("AP", "AP50", "AP75")}}, preds,
            MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes)


def _reusable_pretraining(out: Path) -> dict | None:
    """The pretraining summary of an earlier run in ``out`` (``m2_pretrain.demo`` or this
    demo), if its exported encoder is still there."""
    try:
        with open(out / "results.json") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    pre = saved.get("pretrain", saved)
    files = [pre.get("encoder", ""), pre.get("encoder_untrained", "")]
    return pre if "knn" in pre and all(f and Path(f).is_file() for f in files) else None


def run(output_dir: str | Path, pretrain_overrides: list[str], det_opts: list[str],
        seed: int = 0, reuse_pretraining: bool = False, budget: str = "quick") -> dict:
    """The whole chain; writes ``results.json`` and ``summary.png`` to ``output_dir``.
    ``reuse_pretraining`` skips step 1 when ``output_dir`` holds the exported encoders with
    their kNN results (its pretraining time is then not part of ``total_seconds``)."""
    out = Path(output_dir)
    budget = resolve_budget(budget)
    t0 = time.time()
    pre = _reusable_pretraining(out) if reuse_pretraining else None
    reused = pre is not None
    if reused:
        print(f"== 1/3 pretraining: reusing {pre['encoder']} ({pre['steps']} steps)", flush=True)
    else:
        if reuse_pretraining:
            print(f"== 1/3 nothing to reuse in {out}: pretraining", flush=True)
        over = [f"train.seed={seed}"] + budget_overrides(budget) + pretrain_overrides
        print(f"== 1/3 pretraining (Momentum² Teacher, ResNet-18, embedded shapes), budget "
              f"{budget}, seed {seed}{' (bf16)' if 'train.amp_cpu=true' in over else ''}",
              flush=True)
        pre = pretrain_demo.run(PRETRAIN_CONFIGS[budget], out, over)
    print("== 2/3 converting the exported teacher and the untrained encoder to Detectron2 "
          "weights", flush=True)
    pkl = out / "encoder_d2.pkl"
    conv = convert_file(pre["encoder"], pkl, overwrite=True)  # the demo's own file
    max_diff = verify(pre["encoder"], pkl, res=64)
    pkl_untrained = out / "encoder_untrained_d2.pkl"
    convert_file(pre["encoder_untrained"], pkl_untrained, overwrite=True)  # the demo's own file
    print(f"converted {conv['keys']} tensors (ResNet-{conv['depth']}); --verify max abs diff "
          f"of res2..res5 features: {max_diff:.2e}", flush=True)
    setup_logger(distributed_rank=comm.get_rank(), name="detectron2")  # progress every 20 iters
    print("== 3/3 Mask R-CNN on embedded shapes: from the converted teacher, then from the "
          "converted untrained encoder", flush=True)
    det_opts = ["SEED", str(seed)] + det_opts
    arms = {TEACHER_ARM: (str(pkl), "det_pretrained"),
            UNTRAINED_ARM: (str(pkl_untrained), "det_untrained")}
    det, preds = {}, {}
    for name, (weights, sub) in arms.items():
        det[name], preds[name], class_names = finetune(weights, out / sub, det_opts)
    summary = {"seed": seed, "budget": budget, "pretrain": pre, "pretraining_reused": reused,
               "convert": {**conv, "verify_max_abs_diff": max_diff},
               "detection_config": str(DET_CONFIG), "detection_opts": det_opts,
               "detection": det, "detector_seed_spread": DET_SEED_SPREAD,
               "total_seconds": round(time.time() - t0, 1)}
    summary["findings"] = findings(summary)
    with open(out / "results.json", "w") as f:
        json.dump(summary, f, indent=2)
    first = preds[next(iter(arms))]
    panels = [{"image": read_image(p["file_name"], format="RGB"), "image_id": p["image_id"],
               "pred": {name: preds[name][i] for name in arms}} for i, p in enumerate(first)]
    plot_summary(summary, panels, class_names, out / "summary.png")
    return summary


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default=None,
                    help="default: demo_output, plus /full for the full budget and /seed<n> for "
                         "seeds other than 0")
    ap.add_argument("--budget", default="auto", choices=["auto", "quick", "full"],
                    help="pretraining budget: quick (240 steps), full (3000 steps, bf16 on CPUs "
                         "with bf16), auto (full on CUDA, quick on CPU; the default)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of pretraining and of both detectors (default 0)")
    ap.add_argument("--reuse-pretraining", action="store_true",
                    help="skip pretraining when --output-dir holds an exported encoder and its "
                         "kNN results from an earlier run")
    ap.add_argument("--pretrain", nargs="*", default=[], metavar="KEY=VALUE",
                    help="pretraining config overrides (section.key=value)")
    ap.add_argument("--det", nargs="*", default=[], metavar="KEY VALUE",
                    help="Detectron2 config overrides, e.g. SOLVER.MAX_ITER 100")
    args = ap.parse_args(argv)
    budget = resolve_budget(args.budget)
    args.output_dir = args.output_dir or default_output_dir(budget, args.seed)
    try:
        s = run(args.output_dir, args.pretrain, args.det, args.seed, args.reuse_pretraining,
                budget)
    except RunDirError as e:
        raise SystemExit(f"error: {e}. For the demo: write elsewhere (`make demo "
                         f"DEMO_OUT=other_dir` or --output-dir), rerun only the detectors on the "
                         f"pretraining there (--reuse-pretraining), or remove {args.output_dir}"
                         ) from None
    pretrain_demo.print_summary(s["pretrain"])
    print("\nMask R-CNN R18-FPN, embedded shapes val (COCO AP, %)")
    print(f"{'initialisation':<36} {'box AP':>7} {'box AP50':>9} {'mask AP':>8} "
          f"{'mask AP50':>10} {'time':>7}")
    for name, r in s["detection"].items():
        print(f"{name:<36} {r['bbox']['AP']:>7.1f} {r['bbox']['AP50']:>9.1f} "
              f"{r['segm']['AP']:>8.1f} {r['segm']['AP50']:>10.1f} {r['seconds']:>6.0f}s")
    sp = s["detector_seed_spread"]
    print(f"(spread between detector seeds 0-2, measured once: box AP {sp['bbox']:.1f}, "
          f"mask AP {sp['segm']:.1f})\n")
    print("\n".join(s["findings"]))
    reused = " (pretraining reused, not included)" if s["pretraining_reused"] else ""
    print(f"\ntotal {s['total_seconds'] / 60:.1f} min{reused}; results written to "
          f"{Path(args.output_dir) / 'results.json'}, picture to "
          f"{Path(args.output_dir) / 'summary.png'}")


if __name__ == "__main__":
    main()

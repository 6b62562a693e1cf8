"""`make demo`: the whole chain on the embedded default dataset, on CPU, no download.

1. pretrain a ResNet-18 with Momentum² Teacher on the embedded shapes (32 px, a few minutes)
   and report its kNN accuracy next to random initialisation;
2. export the teacher encoder and convert it to Detectron2 weights, checking the converted
   ResNet against timm's numerically (``--verify``);
3. fine-tune Mask R-CNN R18-FPN on the embedded shapes in COCO format (mosaics of 4 shapes,
   exact masks) for a short schedule, from the converted weights and from random
   initialisation, and print COCO box/mask AP side by side.

Results go to ``<output>/results.json`` and a picture of them to ``<output>/summary.png``
(pretraining curve, kNN and AP bars, masks predicted on a few validation images by both
detectors); Detectron2's metrics, TensorBoard events, predictions and checkpoints to
``<output>/det_pretrained`` and ``<output>/det_random``. ``--seed`` seeds pretraining and both
detectors (the generated data are the same for every seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from m2_pretrain import demo as pretrain_demo
from m2_pretrain.engine.run_dir import RunDirError

from .convert import convert_file, verify
from .demo_plot import plot_summary
from .train import Trainer, build_config

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPO / "configs" / "pretrain" / "embedded_cpu.yaml"
DET_CONFIG = REPO / "configs" / "detectron2" / "demo_shapes_mask_rcnn_R18.yaml"


PANEL_IMAGES = 3  # validation images drawn with each detector's masks in summary.png


def finetune(weights: str, out_dir: Path, opts: list[str]) -> tuple[dict, list[dict], list]:
    """Train and evaluate the demo detector; returns its AP, its predictions on the first
    ``PANEL_IMAGES`` validation images (``masks``, ``classes``, ``scores`` above the test
    score threshold) and the class names."""
    init = ["MODEL.WEIGHTS", weights]
    if not weights:
        init += ["M2.RANDOM_INIT", "True"]
    cfg = build_config(str(DET_CONFIG), init + ["OUTPUT_DIR", str(out_dir)] + opts)
    cfg.freeze()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
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
            preds.append({"file_name": d["file_name"], "image_id": d["image_id"],
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
    return pre if "knn" in pre and Path(pre.get("encoder", "")).is_file() else None


def run(output_dir: str | Path, pretrain_overrides: list[str], det_opts: list[str],
        seed: int = 0, reuse_pretraining: bool = False) -> dict:
    """The whole chain; writes ``results.json`` and ``summary.png`` to ``output_dir``.
    ``reuse_pretraining`` skips step 1 when ``output_dir`` holds an exported encoder with its
    kNN results (its pretraining time is then not part of ``total_seconds``)."""
    out = Path(output_dir)
    t0 = time.time()
    pre = _reusable_pretraining(out) if reuse_pretraining else None
    reused = pre is not None
    if reused:
        print(f"== 1/3 pretraining: reusing {pre['encoder']} ({pre['steps']} steps)", flush=True)
    else:
        if reuse_pretraining:
            print(f"== 1/3 nothing to reuse in {out}: pretraining", flush=True)
        print(f"== 1/3 pretraining (Momentum² Teacher, ResNet-18, embedded shapes), seed {seed}",
              flush=True)
        pre = pretrain_demo.run(PRETRAIN_CONFIG, out, [f"train.seed={seed}"] + pretrain_overrides)
    print("== 2/3 converting the exported teacher to Detectron2 weights", flush=True)
    pkl = out / "encoder_d2.pkl"
    conv = convert_file(pre["encoder"], pkl, overwrite=True)  # the demo's own file
    max_diff = verify(pre["encoder"], pkl, res=64)
    print(f"converted {conv['keys']} tensors (ResNet-{conv['depth']}); --verify max abs diff "
          f"of res2..res5 features: {max_diff:.2e}", flush=True)
    setup_logger(distributed_rank=comm.get_rank(), name="detectron2")  # progress every 20 iters
    print("== 3/3 Mask R-CNN on embedded shapes: from the converted teacher, then from random "
          "initialisation", flush=True)
    det_opts = ["SEED", str(seed)] + det_opts
    arms = {"M2 Teacher (converted)": str(pkl), "random initialisation": ""}
    det, preds = {}, {}
    for name, weights in arms.items():
        sub = out / ("det_pretrained" if weights else "det_random")
        det[name], preds[name], class_names = finetune(weights, sub, det_opts)
    summary = {"seed": seed, "pretrain": pre, "pretraining_reused": reused,
               "convert": {**conv, "verify_max_abs_diff": max_diff},
               "detection_config": str(DET_CONFIG), "detection_opts": det_opts,
               "detection": det, "total_seconds": round(time.time() - t0, 1)}
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
    ap.add_argument("--output-dir", default="demo_output")
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
    try:
        s = run(args.output_dir, args.pretrain, args.det, args.seed, args.reuse_pretraining)
    except RunDirError as e:
        raise SystemExit(f"error: {e}. For the demo: write elsewhere (`make demo "
                         f"DEMO_OUT=other_dir` or --output-dir), rerun only the detectors on the "
                         f"pretraining there (--reuse-pretraining), or remove {args.output_dir}"
                         ) from None
    pretrain_demo.print_summary(s["pretrain"])
    print("\nMask R-CNN R18-FPN, embedded shapes val (COCO AP, %)")
    print(f"{'initialisation':<28} {'box AP':>7} {'box AP50':>9} {'mask AP':>8} "
          f"{'mask AP50':>10} {'time':>7}")
    for name, r in s["detection"].items():
        print(f"{name:<28} {r['bbox']['AP']:>7.1f} {r['bbox']['AP50']:>9.1f} "
              f"{r['segm']['AP']:>8.1f} {r['segm']['AP50']:>10.1f} {r['seconds']:>6.0f}s")
    reused = " (pretraining reused, not included)" if s["pretraining_reused"] else ""
    print(f"\ntotal {s['total_seconds'] / 60:.1f} min{reused}; results written to "
          f"{Path(args.output_dir) / 'results.json'}, picture to "
          f"{Path(args.output_dir) / 'summary.png'}")


if __name__ == "__main__":
    main()

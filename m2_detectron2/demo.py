"""`make demo`: the whole chain on the embedded default dataset, on CPU, no download.

1. pretrain a ResNet-18 with Momentum² Teacher on the embedded shapes (32 px, a few minutes)
   and report its kNN accuracy next to random initialisation;
2. export the teacher encoder and convert it to Detectron2 weights, checking the converted
   ResNet against timm's numerically (``--verify``);
3. fine-tune Mask R-CNN R18-FPN on the embedded shapes in COCO format (mosaics of 4 shapes,
   exact masks) for a short schedule, from the converted weights and from random
   initialisation, and print COCO box/mask AP side by side.

Results go to ``<output>/results.json``; Detectron2's metrics, TensorBoard events,
predictions and checkpoints to ``<output>/det_pretrained`` and ``<output>/det_random``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from m2_pretrain import demo as pretrain_demo
from m2_pretrain.engine.run_dir import RunDirError

from .convert import convert_file, verify
from .train import Trainer, build_config

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPO / "configs" / "pretrain" / "embedded_cpu.yaml"
DET_CONFIG = REPO / "configs" / "detectron2" / "demo_shapes_mask_rcnn_R18.yaml"


def finetune(weights: str, out_dir: Path, opts: list[str]) -> dict:
    cfg = build_config(str(DET_CONFIG), ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out_dir)] + opts)
    cfg.freeze()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    res = trainer._last_eval_results
    return {"seconds": round(time.time() - t0, 1),
            "bbox": {k: res["bbox"][k] for k in ("AP", "AP50", "AP75")},
            "segm": {k: res["segm"][k] for k in ("AP", "AP50", "AP75")}}


def run(output_dir: str | Path, pretrain_overrides: list[str], det_opts: list[str]) -> dict:
    out = Path(output_dir)
    t0 = time.time()
    print("== 1/3 pretraining (Momentum² Teacher, ResNet-18, embedded shapes)", flush=True)
    pre = pretrain_demo.run(PRETRAIN_CONFIG, out, ["model.arch=resnet18"] + pretrain_overrides)
    print("== 2/3 converting the exported teacher to Detectron2 weights", flush=True)
    pkl = out / "encoder_d2.pkl"
    conv = convert_file(pre["encoder"], pkl)
    max_diff = verify(pre["encoder"], pkl, res=64)
    print(f"converted {conv['keys']} tensors (ResNet-{conv['depth']}); --verify max abs diff "
          f"of res2..res5 features: {max_diff:.2e}", flush=True)
    setup_logger(distributed_rank=comm.get_rank(), name="detectron2")  # progress every 20 iters
    print("== 3/3 Mask R-CNN on embedded shapes: from the converted teacher, then from random "
          "initialisation", flush=True)
    det = {"M2 Teacher (converted)": finetune(str(pkl), out / "det_pretrained", det_opts),
           "random initialisation": finetune("", out / "det_random",
                                             det_opts + ["M2.RANDOM_INIT", "True"])}
    summary = {"pretrain": pre, "convert": {**conv, "verify_max_abs_diff": max_diff},
               "detection_config": str(DET_CONFIG), "detection_opts": det_opts,
               "detection": det, "total_seconds": round(time.time() - t0, 1)}
    with open(out / "results.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="demo_output")
    ap.add_argument("--pretrain", nargs="*", default=[], metavar="KEY=VALUE",
                    help="pretraining config overrides (section.key=value)")
    ap.add_argument("--det", nargs="*", default=[], metavar="KEY VALUE",
                    help="Detectron2 config overrides, e.g. SOLVER.MAX_ITER 100")
    args = ap.parse_args(argv)
    try:
        s = run(args.output_dir, args.pretrain, args.det)
    except RunDirError as e:
        raise SystemExit(f"error: {e} (for the demo: pass another --output-dir or remove "
                         f"{args.output_dir})") from None
    pretrain_demo.print_summary(s["pretrain"])
    print(f"\nMask R-CNN R18-FPN, embedded shapes val (COCO AP, %)")
    print(f"{'initialisation':<28} {'box AP':>7} {'box AP50':>9} {'mask AP':>8} {'mask AP50':>10} {'time':>7}")
    for name, r in s["detection"].items():
        print(f"{name:<28} {r['bbox']['AP']:>7.1f} {r['bbox']['AP50']:>9.1f} {r['segm']['AP']:>8.1f} "
              f"{r['segm']['AP50']:>10.1f} {r['seconds']:>6.0f}s")
    print(f"\ntotal {s['total_seconds'] / 60:.1f} min; results written to "
          f"{Path(args.output_dir) / 'results.json'}")


if __name__ == "__main__":
    main()

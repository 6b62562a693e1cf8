"""`make demo`: the main job on the embedded default dataset (no download).

pretrain (Momentum² Teacher, a few CPU minutes) -> export the teacher encoder -> kNN accuracy
of the exported encoder next to the same architecture untrained, with the config's init
(``model.zero_init_last``; the demo configs use the paper's). The untrained encoder is saved
too (``encoder_untrained.pth``, a plain timm state_dict) so that the detectors can start from
it. Results are printed as a table and written to ``<output>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import timm
import torch

from .config import encoder_kwargs, load_config
from .checkpoint import list_checkpoints
from .engine.run_dir import RunDirError
from .engine.trainer import Trainer
from .models.encoder import create_encoder
from .eval.knn import knn_eval_encoder, knn_monitor
from .export import export_encoder, load_exported_encoder

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "embedded_cpu.yaml"


TEACHER = "M2 Teacher (pretrained)"


def untrained_name(cfg) -> str:
    """The baseline's label: which init the untrained network has."""
    init = {False: "paper init", True: "zero-init last BN", None: "timm init"}
    return f"untrained ({init[cfg.model.zero_init_last]})"


def run(config: str | Path, output_dir: str | Path, overrides: list[str]) -> dict:
    cfg = load_config(config, overrides)
    out = Path(output_dir)
    t0 = time.time()
    trainer = Trainer(cfg, out / "pretrain")
    trainer.register_hooks(knn_monitor(trainer))
    result = trainer.fit()
    t_train = time.time() - t0
    if result["status"] != "completed":  # SIGTERM / Ctrl-C: the checkpoint is kept, stop here
        raise SystemExit(f"pretraining {result['status']} at step {result['step']}; its "
                         f"checkpoint is in {out / 'pretrain'}")
    ckpt = list_checkpoints(out / "pretrain")[-1]
    export_encoder(ckpt, out / "encoder.pth", overwrite=True)  # from the fresh run above
    sd, meta = load_exported_encoder(out / "encoder.pth")
    encoder = timm.create_model(meta["arch"], num_classes=0, pretrained=False)
    encoder.load_state_dict(sd, strict=True)
    device = trainer.device
    rows = {TEACHER: knn_eval_encoder(encoder, cfg.data, cfg.knn, device)}
    torch.manual_seed(cfg.train.seed)  # same architecture and init scheme, seeded, untrained
    untrained = create_encoder(meta["arch"], **encoder_kwargs(cfg))
    torch.save(untrained.state_dict(), out / "encoder_untrained.pth")
    rows[untrained_name(cfg)] = knn_eval_encoder(untrained, cfg.data, cfg.knn, device)
    summary = {
        "config": str(config), "overrides": overrides, "steps": result["step"],
        "pretrain_seconds": round(t_train, 1), "checkpoint": str(ckpt),
        "encoder": str(out / "encoder.pth"),
        "encoder_untrained": str(out / "encoder_untrained.pth"), "knn": rows,
        "final_loss": result["history"][-1]["loss"] if result["history"] else None,
        # the loss every `train.log_every` steps, and the teacher's kNN where it was monitored
        "history": [{k: h[k] for k in ("step", "loss", "knn_top1") if k in h}
                    for h in result["history"]],
    }
    with open(out / "results.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def print_summary(s: dict) -> None:
    """The pretraining part of a demo summary: steps, loss and the kNN table."""
    print(f"\npretrained {s['steps']} steps in {s['pretrain_seconds']:.0f} s "
          f"(final loss {s['final_loss']:.4f}); encoder exported to {s['encoder']}")
    print(f"\n{'encoder':<32} {'kNN top-1':>10} {'kNN top-5':>10}")
    for name, r in s["knn"].items():
        print(f"{name:<32} {r['top1']:>10.2f} {r['top5']:>10.2f}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--output-dir", default="demo_output")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = ap.parse_args(argv)
    try:
        summary = run(args.config, args.output_dir, args.overrides)
    except RunDirError as e:
        raise SystemExit(f"error: {e} (for the demo: pass another --output-dir or remove "
                         f"{args.output_dir})") from None
    print_summary(summary)
    print(f"\nresults written to {Path(args.output_dir) / 'results.json'}")


if __name__ == "__main__":
    main()

"""The ``m2-pretrain`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config
from .engine.checkpoint import CheckpointError


def _train(args) -> int:
    from .engine.trainer import NonFiniteLossError, Trainer

    cfg = load_config(args.config, args.overrides)
    out = args.output_dir or "output/pretrain"
    trainer = Trainer(cfg, out, resume=args.resume, progress=not args.no_progress)
    try:
        result = trainer.fit()
    except NonFiniteLossError as e:
        logging.getLogger("m2_pretrain").error("%s", e)
        return 2
    print(f"{result['status']}: step {result['step']}/{result['total_steps']}, "
          f"checkpoints in {out}")
    return 0 if result["status"] == "completed" else 130


def _export(args) -> int:
    from .export import export_encoder

    meta = export_encoder(args.checkpoint, args.out, args.which)
    print(f"wrote {args.out} ({meta.get('arch')}, {args.which}, step {meta['step']}) "
          f"and {args.out}.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m2-pretrain", description="Momentum² Teacher pretraining")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pretrain an encoder")
    t.add_argument("--config", required=False, help="YAML config (configs/pretrain/*.yaml)")
    t.add_argument("--output-dir", help="checkpoints, config.yaml and TensorBoard logs")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="checkpoint -> plain timm encoder state_dict")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--which", choices=("teacher", "student"), default="teacher")
    e.set_defaults(func=_export)
    return ap


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Exception as e:  # DatasetError etc.: one line, not a traceback, for user errors
        from .data.datasets import DatasetError

        if isinstance(e, DatasetError):
            print(f"error: {e}", file=sys.stderr)
            code = 2
        else:
            raise
    sys.exit(code)


if __name__ == "__main__":
    main()

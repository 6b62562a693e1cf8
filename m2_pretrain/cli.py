"""The ``m2-pretrain`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config
from .checkpoint import CheckpointError
from .engine.run_dir import RunDirError
from .eval.common import EvalInputError
from .export import DEFAULT_OUT


def _train(args) -> int:
    from .engine.distributed import REQUEUE_EXIT
    from .engine.trainer import NonFiniteLossError, Trainer
    from .eval.knn import knn_monitor

    cfg = load_config(args.config, args.overrides)
    out = args.output_dir or "output/pretrain"
    trainer = Trainer(cfg, out, resume=args.resume, progress=not args.no_progress,
                      allow_config_changes=args.resume_allow_changes)
    trainer.register_hooks(knn_monitor(trainer))
    try:
        result = trainer.fit()
    except NonFiniteLossError as e:
        logging.getLogger("m2_pretrain").error("%s", e)
        return 2
    print(f"{result['status']}: step {result['step']}/{result['total_steps']}, "
          f"checkpoints in {out}")
    # stopped by a signal after its checkpoint: the sbatch templates requeue on this status
    return 0 if result["status"] == "completed" else REQUEUE_EXIT


def _export(args) -> int:
    from .export import export_encoder, output_files

    meta = export_encoder(args.checkpoint, args.out, args.which, overwrite=args.force)
    written = " and ".join(str(p) for p in output_files(args.out))
    print(f"wrote {written} ({meta.get('arch')}, {meta['which']}, step {meta['step']})")
    return 0


def _evaluate(args) -> int:
    import torch

    from .eval import protocols
    from .eval.common import load_encoder, read_split_file, results_path, write_results
    from .eval.distributed import eval_context
    from .models.encoder import check_encoder_input

    cfg = load_config(args.config, args.overrides)
    out = args.output_dir or f"output/{args.command}"
    results_path(out, overwrite=args.force)  # before anything is evaluated
    encoder, meta = load_encoder(args.weights, args.arch)
    if cfg.model.arch != meta["arch"]:  # the config's default or a copy from pretraining
        logging.getLogger("m2_pretrain").info(
            "evaluating a %s encoder (from %s); the config's model.arch %s is not used",
            meta["arch"], "--arch" if args.arch else "the weights' metadata", cfg.model.arch)
        cfg.model.arch = meta["arch"]  # results.json records the architecture evaluated
    res = cfg.eval.res or cfg.data.res
    try:
        check_encoder_input(meta["arch"], res)
    except Exception as e:  # noqa: BLE001 - whatever the model says about the input size
        key = "eval.res" if cfg.eval.res else "data.res"
        raise ConfigError(f"config key '{key}' ({res}) does not fit timm '{meta['arch']}': "
                          f"{one_line(e)}") from None
    indices = None
    if args.command == "semi":  # a bad split file fails before the processes meet
        from .data.datasets import build_dataset

        train_split = cfg.data.knn_train_split or "train"
        indices = read_split_file(args.split, build_dataset(cfg.data, train_split))
    ctx = eval_context(cfg)  # joins the other processes under torchrun / srun
    try:
        if not ctx.is_main:  # one process reports
            logging.getLogger().setLevel(logging.WARNING)
        torch.manual_seed(cfg.train.seed)  # the same head on every process
        progress = not args.no_progress and ctx.is_main
        extra = {"encoder_meta": meta, "world_size": ctx.world_size}
        if args.command == "linear":
            numbers = protocols.linear_probe(encoder, cfg, ctx.device, progress, ctx)
        elif args.command == "knn":
            numbers = protocols.knn_eval(encoder, cfg, ctx.device, progress, ctx)
        else:
            numbers = protocols.semi_finetune(encoder, cfg, indices, ctx.device, progress, ctx)
            extra["split_file"] = str(args.split)
        if not ctx.is_main:
            return 0
        if args.command == "linear":
            print("linear probe on " + ("precomputed features (no train-time augmentation)"
                                        if numbers["features_precomputed"] else "augmented images"))
        path = write_results(out, args.command, numbers, args.weights, cfg.to_dict(), extra,
                             overwrite=args.force)
    finally:
        ctx.close()
    subset = (f"  (kNN on {numbers['train_images']} of {numbers['train_subsampled_from']} "
              "training images: knn.max_train)" if "train_subsampled_from" in numbers else "")
    procs = (f"  ({ctx.world_size} processes, {ctx.precision})" if ctx.world_size > 1
             else f"  ({ctx.precision})")
    print(f"{args.command}: top-1 {numbers['top1']:.2f}  top-5 {numbers['top5']:.2f}{subset}"
          f"{procs}  -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m2-pretrain", description="Momentum² Teacher pretraining")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pretrain an encoder")
    t.add_argument("--config", required=False, help="YAML config (configs/pretrain/*.yaml)")
    t.add_argument("--output-dir", help="checkpoints, config.yaml and TensorBoard logs")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument("--resume-allow-changes", action="store_true",
                   help="on --resume, accept config changes beyond the safe list (logged)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="checkpoint -> timm encoder weights with metadata")
    e.add_argument("checkpoint")
    e.add_argument("--out", default=DEFAULT_OUT,
                   help=f"encoder file (default {DEFAULT_OUT}): .safetensors is timm's format "
                        "with the metadata in its header; .pth adds a .json metadata sidecar")
    e.add_argument("--force", action="store_true",
                   help="replace an existing --out file (and its sidecar)")
    e.add_argument("--which", choices=("teacher", "student"), default=None,
                   help="branch to export (default: teacher for M2, query encoder for MoCo v2)")
    e.set_defaults(func=_export)
    helps = {"linear": "linear probe of a frozen encoder", "knn": "weighted kNN classification",
             "semi": "semi-supervised fine-tuning on a labelled split file"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("--weights", required=True,
                       help="encoder from `m2-pretrain export` (.safetensors, or .pth + .json)")
        p.add_argument("--config", help="YAML config naming the dataset and eval settings")
        p.add_argument("--arch", help="timm architecture when the weights have no metadata")
        p.add_argument("--output-dir", help="where results.json goes")
        p.add_argument("--force", action="store_true",
                       help="replace an existing results.json in --output-dir")
        p.add_argument("--no-progress", action="store_true")
        if name == "semi":
            p.add_argument("--split", required=True,
                           help="file with one image path or name per line (SimCLR 1%%/10%% format)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides")
        p.set_defaults(func=_evaluate)
    ap.set_defaults(subcommands=sub.choices)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; a subcommand's ``key=value`` overrides may come before, between
    or after its options (``train --no-progress a.b=1 --resume c.d=2``)."""
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    sub = ap.get_default("subcommands")
    if argv and argv[0] in sub:
        args = sub[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return ap.parse_args(argv)  # help, or the error naming the valid subcommands


def one_line(e: BaseException) -> str:
    """The message of a user error on one line. An error re-raised from a DataLoader worker
    carries the worker's traceback in its message: keep only the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1].strip()
        text = last.split(f"{type(e).__name__}: ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, CheckpointError, EvalInputError, RunDirError, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = 2
    except Exception as e:  # DatasetError etc.: one line, not a traceback, for user errors
        from .data.datasets import DatasetError

        if isinstance(e, DatasetError):
            print(f"error: {one_line(e)}", file=sys.stderr)
            code = 2
        else:
            raise
    sys.exit(code)


if __name__ == "__main__":
    main()

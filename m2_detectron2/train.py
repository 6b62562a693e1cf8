"""Training / evaluation entry points for ``tools/train_net.py`` (Detectron2 plugin shape:
``setup`` -> ``main`` -> ``launch``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from .checks import SetupError, check_config
from .config import add_m2_config
from .data import DatasetSpecError, register_coco_spec, register_embedded
from .evaluation import build_evaluator
from .safe_load import UnsafePickleError, load_pickle, restricted_pickle_loading

logger = logging.getLogger("m2_detectron2")


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with COCO/LVIS evaluation chosen per dataset."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def resume_or_load(self, resume: bool = True):
        """Detectron2's, with ``.pkl`` weights read by the restricted unpickler."""
        with restricted_pickle_loading():
            return super().resume_or_load(resume=resume)


def build_config(config_file: str, opts: list[str], register_coco: list[str] = (),
                 resume: bool = False):
    """Load a yacs config with the plugin's keys, register datasets, adapt to CPU, and run
    :func:`m2_detectron2.checks.check_config` (weights, class counts)."""
    cfg = get_cfg()
    add_m2_config(cfg)
    if not Path(config_file).is_file():
        raise SetupError(f"config file {config_file} does not exist")
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    register_embedded()
    for spec in list(cfg.M2.REGISTER_COCO) + list(register_coco):
        register_coco_spec(spec)
    known = set(DatasetCatalog.list())
    unknown = [d for d in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) if d not in known]
    if unknown:
        raise SetupError(
            f"unknown dataset(s) {unknown}: COCO/LVIS go under $DETECTRON2_DATASETS "
            f"(now {os.environ.get('DETECTRON2_DATASETS', 'datasets')}); other COCO-format sets "
            "are registered with --register-coco name=annotations.json:image_dir")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on CPU (SyncBN acts as BN on one process)")
        cfg.MODEL.DEVICE = "cpu"
    check_config(cfg, resume=resume)
    return cfg


def setup(args):
    cfg = build_config(args.config_file, args.opts, getattr(args, "register_coco", []) or [],
                       resume=getattr(args, "resume", False))
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def validate_setup(args) -> None:
    """Check the whole setup once in the launching process, before ``launch`` starts worker
    processes (where an error would escape the one-line handler as a traceback per worker).

    Raises:
        SetupError: a bad config key or value, dataset registration, backbone setting, or
            weights file (a ``.pkl`` is read with the restricted unpickler).
    """
    try:
        # build_config ends with checks.check_config (weights, class counts): it runs here too
        cfg = build_config(args.config_file, args.opts, getattr(args, "register_coco", []) or [],
                           resume=getattr(args, "resume", False))
    except SetupError:
        raise
    except (DatasetSpecError, KeyError, ValueError, AssertionError) as e:  # yacs: bad key/value
        text = str(e).strip().strip("'\"")
        raise SetupError(text.splitlines()[0] if text else type(e).__name__) from None
    if cfg.MODEL.BACKBONE.NAME.startswith("build_timm"):
        _check_timm_setup(cfg)
    w = cfg.MODEL.WEIGHTS
    if w.endswith(".pkl") and "://" not in w and Path(w).is_file():
        try:
            load_pickle(w)
        except UnsafePickleError as e:
            raise SetupError(f"MODEL.WEIGHTS={e}") from None


def _check_timm_setup(cfg) -> None:
    """``MODEL.TIMM.*`` values that would otherwise fail only when the model is built."""
    import timm

    from .modeling.timm_backbone import _NORMS

    if cfg.MODEL.TIMM.NORM not in _NORMS:
        raise SetupError(f"MODEL.TIMM.NORM must be one of {_NORMS}, got {cfg.MODEL.TIMM.NORM!r}")
    if not timm.is_model(cfg.MODEL.TIMM.ARCH.split(".")[0]):
        raise SetupError(f"MODEL.TIMM.ARCH names no timm model: {cfg.MODEL.TIMM.ARCH!r} "
                         "(see timm.list_models())")


def write_results(cfg, results) -> None:
    if comm.is_main_process() and results:
        out = Path(cfg.OUTPUT_DIR) / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            json.dump({"config": cfg.dump(), "results": results}, f, indent=2, default=float)
        logger.info("results written to %s", out)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        with restricted_pickle_loading():
            DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        write_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    write_results(cfg, results)
    return results

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
from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from .checkpoint import RestrictedCheckpointer
from .checks import (
    SetupError,
    check_config,
    check_config_file,
    check_dataset_files,
    check_num_gpus,
    check_output_dir,
    check_timm_backbone,
    check_weights_fit,
    fetch_remote_weights,
    local_weights_path,
)
from .config import add_m2_config
from .data import DatasetSpecError, build_mapper, register_coco_spec, register_embedded
from .evaluation import build_evaluator
from .stop import StopOnSignal

logger = logging.getLogger("m2_detectron2")


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with COCO/LVIS evaluation chosen per dataset, images read
    by :func:`m2_detectron2.data.read_image` and every weights file read by the restricted
    loaders."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        _restrict(self.checkpointer)

    def build_hooks(self):
        """Detectron2's hooks, then :class:`~m2_detectron2.stop.StopOnSignal` (a stop signal
        checkpoints after the iteration all processes agree on)."""
        return super().build_hooks() + [StopOnSignal(self.checkpointer)]

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def resume_or_load(self, resume: bool = True):
        """Detectron2's, with every weights file read by the restricted loaders."""
        _restrict(self.checkpointer)
        return super().resume_or_load(resume=resume)


def _restrict(checkpointer: DetectionCheckpointer) -> None:
    """Make Detectron2's own checkpointer read files with the restricted loaders.

    DefaultTrainer creates it inside ``__init__`` (there is no factory method) and its
    checkpoint hook holds the same object, so the object's class is switched in place.
    """
    if type(checkpointer) not in (DetectionCheckpointer, RestrictedCheckpointer):
        raise TypeError(f"unexpected checkpointer {type(checkpointer).__name__}")
    checkpointer.__class__ = RestrictedCheckpointer


def build_config(config_file: str, opts: list[str], register_coco: list[str] = (),
                 resume: bool = False, eval_only: bool = False):
    """Load a yacs config with the plugin's keys, register (and validate) datasets, adapt to
    CPU, and run :func:`m2_detectron2.checks.check_config` (weights, class counts of the
    datasets the run uses)."""
    cfg = get_cfg()
    add_m2_config(cfg)
    check_config_file(config_file)
    # Detectron2's default (allow_unsafe=True) would fall back to yaml.unsafe_load
    cfg.merge_from_file(config_file, allow_unsafe=False)
    cfg.merge_from_list(list(opts))
    register_embedded()
    for spec in list(cfg.M2.REGISTER_COCO) + list(register_coco):
        register_coco_spec(spec, need_masks=cfg.MODEL.MASK_ON,
                           mask_format=cfg.INPUT.MASK_FORMAT)
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
    cfg.MODEL.WEIGHTS = local_weights_path(cfg.MODEL.WEIGHTS)
    check_config(cfg, resume=resume, eval_only=eval_only)
    return cfg


def setup(args):
    cfg = build_config(args.config_file, args.opts, getattr(args, "register_coco", []) or [],
                       resume=getattr(args, "resume", False),
                       eval_only=getattr(args, "eval_only", False))
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def validate_setup(args) -> None:
    """Check the whole setup once in the launching process, before ``launch`` starts worker
    processes (where an error would escape the one-line handler as a traceback per worker).

    Besides :func:`build_config`'s checks: ``--num-gpus`` against the machine, an
    ``OUTPUT_DIR`` holding another run (without ``--resume``), the ``MODEL.TIMM.*`` values,
    the files of every dataset the run uses, a ``MODEL.WEIGHTS`` URL (downloaded here), and
    every weights file against the model it loads into
    (:func:`m2_detectron2.checks.check_weights_fit`, read with the restricted loaders).

    Raises:
        SetupError: a bad config key or value, dataset, backbone setting, or weights file.
    """
    resume, eval_only = getattr(args, "resume", False), getattr(args, "eval_only", False)
    try:
        cfg = build_config(args.config_file, args.opts, getattr(args, "register_coco", []) or [],
                           resume=resume, eval_only=eval_only)
    except SetupError:
        raise
    except (DatasetSpecError, KeyError, ValueError, AssertionError) as e:  # yacs: bad key/value
        text = str(e).strip().strip("'\"")
        raise SetupError(text.splitlines()[0] if text else type(e).__name__) from None
    if cfg.MODEL.BACKBONE.NAME.startswith("build_timm"):
        check_timm_backbone(cfg)
    check_output_dir(cfg, resume=resume, eval_only=eval_only)
    check_dataset_files(cfg, eval_only=eval_only)
    local = fetch_remote_weights(cfg)
    if local is not None:  # check the downloaded copy
        cfg = cfg.clone()
        cfg.MODEL.WEIGHTS = local
    check_weights_fit(cfg, eval_only=eval_only, resume=resume)
    check_num_gpus(getattr(args, "num_gpus", 1))


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
        RestrictedCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
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

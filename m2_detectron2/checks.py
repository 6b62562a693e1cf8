"""Setup-time checks of a built transfer config: mistakes that would otherwise cost a whole
training run are one-line ``SetupError``s naming the key to set.

- Empty ``MODEL.WEIGHTS`` (``MODEL.TIMM.WEIGHTS`` for the timm-backbone configs) would train
  from random initialisation, and Detectron2 only logs "No checkpoint found" (about 31 AP
  instead of 39.7 for Mask R-CNN 1x, Table 9a): it needs ``M2.RANDOM_INIT True``.
- The model's class count must equal the number of categories of the training dataset, read
  from the key the meta-architecture really uses (``M2FCOS`` reads only ``MODEL.FCOS.*``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from m2_pretrain.export import meta_path

logger = logging.getLogger("m2_detectron2")

TIMM_BACKBONES = ("build_timm_fpn_backbone", "build_timm_retinanet_fpn_backbone")

# meta-architecture -> the config key holding its number of classes (None: class-agnostic)
NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "PanopticFPN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "M2FCOS": "MODEL.FCOS.NUM_CLASSES",
    "ProposalNetwork": None,
}


class SetupError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_weights(cfg, resume: bool = False) -> None:
    """Refuse empty weights unless ``M2.RANDOM_INIT`` is set; refuse missing files and
    exported encoders given as ``MODEL.WEIGHTS``.

    Args:
        cfg: a config built with :func:`m2_detectron2.config.add_m2_config`.
        resume: ``--resume``; an existing ``OUTPUT_DIR/last_checkpoint`` then replaces the
            initial weights, so empty weights are fine.
    """
    w = cfg.MODEL.WEIGHTS
    timm_backbone = cfg.MODEL.BACKBONE.NAME in TIMM_BACKBONES
    if not w:
        if timm_backbone and cfg.MODEL.TIMM.WEIGHTS:
            t = cfg.MODEL.TIMM.WEIGHTS
            if "://" not in t and not Path(t).is_file():
                raise SetupError(f"MODEL.TIMM.WEIGHTS={t} does not exist")
            return
        if resume and (Path(cfg.OUTPUT_DIR) / "last_checkpoint").is_file():
            return
        if cfg.M2.RANDOM_INIT:
            logger.warning("training from random initialisation (M2.RANDOM_INIT True)")
            return
        if timm_backbone:
            raise SetupError("MODEL.TIMM.WEIGHTS is empty: set it to an exported encoder "
                             "(`m2-pretrain export`), or pass M2.RANDOM_INIT True to train from "
                             "random initialisation")
        raise SetupError("MODEL.WEIGHTS is empty: set it to the converted weights "
                         "(`python tools/convert_to_d2.py`), or pass M2.RANDOM_INIT True to "
                         "train from random initialisation")
    if "://" in w:
        return
    if not Path(w).is_file():
        raise SetupError(f"MODEL.WEIGHTS={w} does not exist")
    if meta_path(w).is_file():
        raise SetupError(
            f"MODEL.WEIGHTS={w} looks like an exported encoder (timm names, with a .json "
            "sidecar): convert it with `python tools/convert_to_d2.py` for the ResNet configs, "
            "or pass it as MODEL.TIMM.WEIGHTS with a timm-backbone config")


def dataset_classes(name: str) -> list[str] | None:
    """The category names Detectron2 will train ``name`` with (``thing_classes``), or None.

    Built-in COCO/LVIS sets carry them from registration; sets registered from a json file get
    them when loaded, so those are loaded here (as the training loader will do again).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        logger.info("loading dataset %s to read its categories", name)
        DatasetCatalog.get(name)
    classes = meta.get("thing_classes")
    return list(classes) if classes is not None else None


def check_num_classes(cfg) -> None:
    """The model's class count (from the key its meta-architecture reads) must equal the
    number of categories of every training dataset."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in NUM_CLASSES_KEYS:
        logger.warning("class count not checked: unknown META_ARCHITECTURE %s", arch)
        return
    key = NUM_CLASSES_KEYS[arch]
    if key is None:
        return
    n = _get(cfg, key)
    for name in cfg.DATASETS.TRAIN:
        classes = dataset_classes(name)
        if classes is None:
            logger.warning("class count not checked: dataset %s has no thing_classes", name)
        elif len(classes) != n:
            raise SetupError(f"{key} is {n} but training dataset {name} has {len(classes)} "
                             f"categories: set {key} {len(classes)}")


def check_config(cfg, resume: bool = False) -> None:
    """All setup-time checks on a built config (datasets must be registered already).

    Raises:
        SetupError: with a one-line message naming the key to change.
    """
    check_weights(cfg, resume=resume)
    check_num_classes(cfg)

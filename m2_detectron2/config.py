"""``add_m2_config(cfg)``: the config keys the plugin adds to Detectron2's yacs defaults."""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_m2_config(cfg: CN) -> CN:
    """Add the plugin's keys (``MODEL.FCOS``, ``MODEL.TIMM``, ``M2``) to ``cfg`` in place.

    Importing this module also registers the plugin's meta-architecture and backbones.
    """
    from . import modeling  # noqa: F401  (registers M2FCOS and the timm backbones)

    # FCOS (Tian et al.) for yacs configs; the model is Detectron2's own FCOS class.
    cfg.MODEL.FCOS = CN()
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.FCOS.NUM_CONVS = 4
    cfg.MODEL.FCOS.HEAD_NORM = "GN"
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6

    # Any timm CNN as a Detectron2 backbone (features_only) + FPN.
    cfg.MODEL.TIMM = CN()
    cfg.MODEL.TIMM.ARCH = "resnet50"
    # An exported encoder (`m2-pretrain export`), a training checkpoint or a timm state_dict;
    # loaded into the timm model before MODEL.WEIGHTS (leave that empty for these configs).
    cfg.MODEL.TIMM.WEIGHTS = ""
    cfg.MODEL.TIMM.WHICH = ""  # teacher|student for training checkpoints ("" = default)
    # timm feature levels as Detectron2 names: feature with stride 2**k is called "res{k}".
    cfg.MODEL.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.TIMM.NORM = "SyncBN"  # BN | SyncBN | FrozenBN (replaces every BatchNorm2d)
    cfg.MODEL.TIMM.FREEZE_AT = 0  # number of leading feature stages (stem = 1) to freeze

    # Dataset conveniences (see m2_detectron2.data).
    cfg.M2 = CN()
    # Extra COCO-format datasets: each entry "name=path/to/annotations.json:path/to/images".
    cfg.M2.REGISTER_COCO = []
    cfg.M2.RANDOM_INIT = False  # train from random initialisation when no weights are given (explicit opt-in)
    return cfg

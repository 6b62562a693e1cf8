"""FCOS for yacs configs.

Detectron2 ships FCOS only as a LazyConfig model. ``M2FCOS`` is Detectron2's own ``FCOS``
class (unchanged training and inference code) with a ``from_config`` that reads
``cfg.MODEL.FCOS``; it is registered as ``META_ARCHITECTURE: "M2FCOS"``. The matching
backbone ``build_fcos_resnet_fpn_backbone`` computes P6/P7 from P5 (as the LazyConfig does),
not from C5 as RetinaNet's does.
"""

from __future__ import annotations

from detectron2.config import configurable
from torch import nn
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups, as "GN" means in Detectron2. v0.6's RetinaNetHead probes ``norm(1)`` only to
    # read the layer type, which recent torch rejects for 32 groups; the probe gets 1 group.
    return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)


def _head_norm(norm: str):
    return _group_norm if norm == "GN" else norm


@META_ARCH_REGISTRY.register()
class M2FCOS(FCOS):
    """Detectron2's FCOS built from ``cfg.MODEL.FCOS`` (GN head, centerness, P3–P7)."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        f = cfg.MODEL.FCOS
        shapes = backbone.output_shape()
        missing = [k for k in f.IN_FEATURES if k not in shapes]
        if missing:
            raise ValueError(f"MODEL.FCOS.IN_FEATURES {missing} are not produced by the backbone "
                             f"(it outputs {sorted(shapes)})")
        feature_shapes = [shapes[k] for k in f.IN_FEATURES]
        channels = feature_shapes[0].channels
        head = FCOSHead(
            input_shape=feature_shapes,
            conv_dims=[channels] * f.NUM_CONVS,
            num_classes=f.NUM_CLASSES,
            norm=_head_norm(f.HEAD_NORM),
            prior_prob=f.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(f.IN_FEATURES),
            "num_classes": f.NUM_CLASSES,
            "center_sampling_radius": f.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": f.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": f.FOCAL_LOSS_GAMMA,
            "test_score_thresh": f.SCORE_THRESH_TEST,
            "test_topk_candidates": f.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": f.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN (P3–P5) + P6/P7 computed from P5, as in FCOS."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

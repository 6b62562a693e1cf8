"""Everything the plugin registers into Detectron2 (importing this module registers it)."""

from .fcos import M2FCOS, build_fcos_resnet_fpn_backbone
from .timm_backbone import TimmBackbone, build_timm_fpn_backbone, build_timm_retinanet_fpn_backbone

__all__ = [
    "M2FCOS",
    "TimmBackbone",
    "build_fcos_resnet_fpn_backbone",
    "build_timm_fpn_backbone",
    "build_timm_retinanet_fpn_backbone",
]

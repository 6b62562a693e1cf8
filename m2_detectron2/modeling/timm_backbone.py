"""Any timm CNN as a Detectron2 backbone (``features_only``), plus FPN builders.

Feature levels are named the Detectron2 way from timm's ``feature_info``: the level with
stride ``2**k`` is ``res{k}`` (so ResNet's layer1..layer4 are res2..res5 and the FPN configs
of the ResNet models apply unchanged). ``MODEL.TIMM.WEIGHTS`` loads an exported encoder (or a
training checkpoint, or a timm state_dict) directly — no conversion step — which is how
encoders other than ResNets transfer.
"""

from __future__ import annotations

import logging
import math

import timm
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

from ..convert import ConversionError, load_encoder_state

logger = logging.getLogger(__name__)

NORMS = ("BN", "SyncBN", "FrozenBN")  # MODEL.TIMM.NORM


def _level_name(stride: int) -> str:
    k = math.log2(stride)
    if k != int(k):
        raise ValueError(f"timm feature stride {stride} is not a power of two")
    return f"res{int(k)}"


class TimmBackbone(Backbone):
    """A timm model with ``features_only=True`` returning ``{"res2": ..., "res5": ...}``.

    Args:
        arch: timm model name (any CNN that supports ``features_only``).
        out_features: Detectron2 level names to return (``res{log2(stride)}``).
        norm: "BN" (trainable, per-GPU), "SyncBN" or "FrozenBN"; replaces every BatchNorm.
        freeze_at: number of leading feature stages (the stem counts as 1) whose parameters
            are frozen, as ``MODEL.BACKBONE.FREEZE_AT`` does for Detectron2's ResNet.
        weights: optional encoder file to load (see :func:`load_timm_weights`).
        which: teacher|student for training checkpoints.
    """

    def __init__(self, arch: str, out_features, norm: str = "BN", freeze_at: int = 0,
                 weights: str = "", which: str | None = None) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"MODEL.TIMM.NORM must be one of {NORMS}, got {norm!r}")
        probe = timm.create_model(arch, pretrained=False, features_only=True)
        info = probe.feature_info.get_dicts()
        names = [_level_name(d["reduction"]) for d in info]
        unknown = [f for f in out_features if f not in names]
        if unknown:
            raise ValueError(f"{arch} has no feature level(s) {unknown}; available: {names}")
        indices = tuple(i for i, n in enumerate(names) if n in out_features)
        del probe
        self.arch = arch
        self.body = timm.create_model(arch, pretrained=False, features_only=True,
                                      out_indices=indices)
        self._names = [names[i] for i in indices]
        self._out_features = list(self._names)
        self._out_feature_channels = {names[i]: info[i]["num_chs"] for i in indices}
        self._out_feature_strides = {names[i]: info[i]["reduction"] for i in indices}
        if weights:
            load_timm_weights(self.body, weights, which or None)
        # Freeze first (on plain BN), then swap the norm layers.
        if freeze_at > 0:
            self._freeze(info, freeze_at)
        if norm == "SyncBN":
            self.body = convert_sync_batchnorm(self.body)
        elif norm == "FrozenBN":
            self.body = freeze_batch_norm_2d(self.body)

    def _freeze(self, info, freeze_at: int) -> None:
        """Freeze every module up to and including the one producing the ``freeze_at``-th
        feature level (in registration order, which is forward order for timm's CNNs): no
        gradients, and BatchNorm replaced by frozen BN, as Detectron2's ResNet does."""
        target = info[min(freeze_at, len(info)) - 1]["module"]
        names = [n for n, _ in self.body.named_modules() if n]
        inside = [i for i, n in enumerate(names) if n == target or n.startswith(target + ".")]
        if not inside:
            raise ValueError(f"{self.arch}: feature module {target!r} not found")
        for name in names[: inside[-1] + 1]:
            module = self.body.get_submodule(name)
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                parent, _, attr = name.rpartition(".")
                owner = self.body.get_submodule(parent) if parent else self.body
                setattr(owner, attr, freeze_batch_norm_2d(module))

    def forward(self, x):
        return dict(zip(self._names, self.body(x)))

    @property
    def size_divisibility(self) -> int:
        return max(self._out_feature_strides.values())


def timm_weights_problem(own: dict[str, tuple], sd: dict[str, torch.Tensor]) -> str | None:
    """Why ``sd`` (timm names) does not fit a ``features_only`` model whose tensors have the
    shapes ``own``; None when it fits.

    Every tensor of the model must be in ``sd`` with its shape; extra keys are allowed only
    for modules ``features_only`` removes (the classifier, layers after the last feature
    level). BatchNorm counters (``num_batches_tracked``) are ignored on both sides.
    """
    counter = "num_batches_tracked"
    own = {k: tuple(v) for k, v in own.items() if not k.endswith(counter)}
    missing = [k for k in own if k not in sd]
    if missing:
        return (f"{len(missing)} of the backbone's {len(own)} tensors are missing from the file "
                f"(another architecture?): {', '.join(missing[:10])}")
    top = {k.split(".")[0] for k in own}
    extra = sorted(k for k in sd if k not in own and k.split(".")[0] in top
                   and not k.endswith(counter))
    if extra:
        return f"keys inside the backbone's modules that it does not have: {', '.join(extra[:10])}"
    shapes = [f"{k} {tuple(sd[k].shape)} (model {own[k]})" for k in own
              if tuple(sd[k].shape) != own[k]]
    if shapes:
        return f"shape mismatch for {', '.join(shapes[:5])}"
    return None


def load_timm_weights(model: torch.nn.Module, path: str, which: str | None = None) -> None:
    """Load encoder weights (timm names) into a ``features_only`` model.

    Accepts what :func:`m2_detectron2.convert.load_encoder_state` reads (an exported encoder,
    ``.safetensors`` or ``.pth``; a training checkpoint; a timm state_dict).

    Raises:
        ConversionError: the weights do not fit (see :func:`timm_weights_problem`).
    """
    sd = load_encoder_state(path, which)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = model.state_dict()
    problem = timm_weights_problem({k: tuple(v.shape) for k, v in own.items()}, sd)
    if problem:
        raise ConversionError(f"{path}: {problem}")
    model.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)
    top = {k.split(".")[0] for k in own}
    skipped = sorted({k.split(".")[0] for k in sd if k.split(".")[0] not in top})
    logger.info("loaded %d tensors from %s into timm %s (not used: %s)", len(own), path,
                type(model).__name__, ", ".join(skipped) or "nothing")


def _timm_bottom_up(cfg) -> TimmBackbone:
    t = cfg.MODEL.TIMM
    return TimmBackbone(t.ARCH, list(t.OUT_FEATURES), norm=t.NORM, freeze_at=t.FREEZE_AT,
                        weights=t.WEIGHTS, which=t.WHICH or None)


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec):
    """timm CNN + FPN with P6 by max-pooling (Mask R-CNN / Cascade)."""
    return FPN(
        bottom_up=_timm_bottom_up(cfg),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_timm_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """timm CNN + FPN with P6/P7 from P5 (RetinaNet / FCOS)."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=_timm_bottom_up(cfg),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

"""timm / torchvision ResNet weights -> Detectron2 ResNet weights (.pkl).

Accepts a training checkpoint of this toolkit (teacher or student encoder), an exported
encoder (``m2-pretrain export``), or a torchvision/timm ResNet ``state_dict`` (the supervised
baseline). Every encoder key must map to a Detectron2 name; the classifier (``fc``) of a
supervised model is dropped; anything else unmapped is an error listing the keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from m2_pretrain.checkpoint import CKPT_RE, atomic_write, first_non_finite, safe_load
from m2_pretrain.export import (
    default_branch,
    encoder_state_from_checkpoint,
    is_safetensors,
    is_training_checkpoint,
    load_exported_encoder,
    meta_path,
)

from .safe_load import dump_pickle, load_pickle

AUTHOR = "m2_teacher toolkit (converted from a timm/torchvision ResNet)"

# Keys that are knowingly not part of the encoder: the supervised classifier, BN counters.
_DROPPED = re.compile(r"^(fc\.(weight|bias))$|(^|\.)num_batches_tracked$")


class ConversionError(ValueError):
    """Keys that cannot be converted; the message lists them."""


_BN = r"(weight|bias|running_mean|running_var)"
# (timm/torchvision pattern, Detectron2 template); groups: stage, block, conv index, BN field.
_RULES = [
    (re.compile(r"conv1\.weight"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"bn1\.{_BN}"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (re.compile(r"layer([1-4])\.(\d+)\.conv([1-3])\.weight"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(rf"layer([1-4])\.(\d+)\.bn([1-3])\.{_BN}"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(r"layer([1-4])\.(\d+)\.downsample\.0\.weight"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (re.compile(rf"layer([1-4])\.(\d+)\.downsample\.1\.{_BN}"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
]


def _map_key(key: str) -> Optional[str]:
    """timm/torchvision ResNet key -> Detectron2 key (None when it does not map)."""
    for pattern, template in _RULES:
        m = pattern.fullmatch(key)
        if m:
            return template(m)
    return None


def load_encoder_and_meta(path: str | Path, which: Optional[str] = None
                          ) -> tuple[dict[str, torch.Tensor], dict]:
    """Encoder weights (timm names) and what is known about them, from a training checkpoint
    (its ``meta``, the branch and step), an exported encoder (``.safetensors`` with its header
    metadata, or ``.pth`` with or without its ``.json`` sidecar) or a state_dict ({}).

    Raises:
        ConversionError / CheckpointError: an unusable file, unreadable metadata, or a weight
            or statistic that is NaN/inf (as ``m2-pretrain export`` refuses).
    """
    meta: dict = {}
    if is_safetensors(path):
        if which is not None:
            raise ConversionError(f"--which only applies to training checkpoints; {path} is an "
                                  "exported encoder")
        sd, meta = load_exported_encoder(path)
        meta = dict(meta or {})
    else:
        obj = safe_load(path)
        if is_training_checkpoint(obj):
            which = which or default_branch(obj)
            sd = encoder_state_from_checkpoint(obj, which)
            meta = {**dict(obj.get("meta") or {}), "which": which,
                    "step": int(obj.get("step", -1))}
        else:
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"],
                                                                           dict):
                obj = obj["state_dict"]  # common wrapper of published checkpoints
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor)
                                                    for v in obj.values()):
                raise ConversionError(f"{path}: not a state_dict of tensors nor a training "
                                      "checkpoint")
            if which is not None:
                raise ConversionError(f"--which only applies to training checkpoints; {path} is "
                                      "a state_dict")
            sd = obj
            if meta_path(path).is_file():  # an exported .pth: its sidecar must be readable
                sd, meta = load_exported_encoder(path)
                meta = dict(meta or {})
    bad = first_non_finite(sd.items())
    if bad is not None:
        raise ConversionError(f"{path}: tensor {bad} holds NaN or inf values; refusing to convert "
                              "a broken encoder (convert an earlier checkpoint)")
    return sd, meta


def load_encoder_state(path: str | Path, which: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Encoder weights (timm names) of :func:`load_encoder_and_meta`."""
    return load_encoder_and_meta(path, which)[0]


def convert_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Map every key; returns (Detectron2 weights, dropped keys).

    Raises:
        ConversionError: listing keys that are neither mapped nor knowingly dropped.
    """
    out, dropped, unmapped = {}, [], []
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module."):]
        new = _map_key(k)
        if new is not None:
            out[new] = v.detach().cpu().float().numpy()
        elif _DROPPED.search(k):
            dropped.append(k)
        else:
            unmapped.append(k)
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} keys cannot be converted to Detectron2 ResNet names "
            f"(is this a torchvision-style ResNet?): {', '.join(unmapped[:20])}"
            + (" ..." if len(unmapped) > 20 else ""))
    if "stem.conv1.weight" not in out:
        raise ConversionError("no ResNet stem (conv1.weight) found: not a ResNet encoder")
    return out, dropped


def resnet_depth(d2_weights: dict[str, np.ndarray]) -> int:
    """Depth (18/34/50/101/152) from the block counts and block type."""
    blocks = tuple(
        len({k.split(".")[1] for k in d2_weights if k.startswith(f"res{s}.")}) for s in (2, 3, 4, 5))
    bottleneck = any(k.endswith("conv3.weight") for k in d2_weights)
    table = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
             (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}
    depth = table.get(blocks + (bottleneck,))
    if depth is None:
        raise ConversionError(f"unsupported ResNet layout: blocks {blocks}, bottleneck={bottleneck}")
    return depth


# Key of the converted file that records where the weights came from (ignored by Detectron2).
META_KEY = "m2_teacher"


def write_d2_pickle(d2_weights: dict[str, np.ndarray], out: str | Path,
                    meta: Optional[dict] = None) -> None:
    """Write Detectron2's ``{"model", "__author__", "matching_heuristics"}`` pickle in a form
    that numpy 1 and numpy 2 both read (see :func:`m2_detectron2.safe_load.dump_pickle`), with
    ``meta`` (plain strings and numbers) under :data:`META_KEY`.

    Written with :func:`m2_pretrain.checkpoint.atomic_write` (temporary file, fsync, rename):
    an interrupted write leaves the previous ``out`` as it was.
    """
    payload = {"model": d2_weights, "__author__": AUTHOR, "matching_heuristics": True}
    if meta:
        payload[META_KEY] = meta
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: dump_pickle(payload, f))


def check_output(src: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Refuse an output that Detectron2 would not read as a pickle (any name but ``.pkl``), a
    directory, the input itself, a training checkpoint, or an existing file unless
    ``overwrite``.

    Raises:
        ConversionError: one line saying which and what to pass instead.
    """
    if str(out).endswith(("/", os.sep)):  # Path() would drop the slash
        raise ConversionError(f"output {out} names a directory; name a .pkl file in it")
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise ConversionError(f"output {out} is a directory; name a .pkl file in it")
    if out.exists() and src.exists() and out.samefile(src):
        raise ConversionError(f"output {out} is the input file itself; choose another name")
    if CKPT_RE.match(out.name):
        raise ConversionError(f"output {out} is named like a training checkpoint; choose a "
                              "name ending in .pkl")
    if out.suffix != ".pkl":
        raise ConversionError(f"output {out} must end in .pkl: Detectron2 reads any other name "
                              "with torch.load, not as converted weights")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; choose another output or pass --force to "
                              "replace it")


def convert_file(src: str | Path, out: str | Path, which: Optional[str] = None,
                 overwrite: bool = False) -> dict:
    """Convert ``src`` to a Detectron2 ``.pkl`` at ``out`` (see :func:`check_output`).

    The weights pass export's checks (every tensor finite, readable metadata whose ``arch``
    agrees with the weights) and the metadata travels in the file under :data:`META_KEY`.

    Returns:
        A summary dict: ``keys``, ``dropped``, ``depth``, ``out``, ``meta``.
    """
    check_output(src, out, overwrite)
    sd, meta = load_encoder_and_meta(src, which)
    d2, dropped = convert_state_dict(sd)
    depth = resnet_depth(d2)
    arch = meta.get("arch")
    if arch and str(arch).startswith("resnet") and str(arch).split(".")[0] != f"resnet{depth}":
        raise ConversionError(f"{src}: its metadata says {arch} but the weights are a "
                              f"ResNet-{depth}; fix or remove the metadata")
    record = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
    record.update({"source": str(Path(src).resolve()), "depth": depth})
    write_d2_pickle(d2, out, record)
    return {"keys": len(d2), "dropped": dropped, "depth": depth, "out": str(out), "meta": record}


@torch.no_grad()
def verify(src: str | Path, d2_pkl: str | Path, which: Optional[str] = None, res: int = 224,
           arch: Optional[str] = None) -> float:
    """Build Detectron2's ResNet from ``d2_pkl`` and timm's from ``src``; return the max abs
    difference of res2..res5 features on one random image (both in eval mode)."""
    import timm

    from . import install_c_standin  # noqa: F401  (detectron2._C stand-in when needed)
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    sd = load_encoder_state(src, which)
    d2 = load_pickle(d2_pkl)["model"]
    depth = resnet_depth(d2)
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    missing, unexpected = backbone.load_state_dict({k: torch.from_numpy(v) for k, v in d2.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConversionError(f"Detectron2 ResNet-{depth} does not accept the weights: missing "
                              f"{missing[:10]}, unexpected {unexpected[:10]}")
    arch = arch or f"resnet{depth}"
    ref = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True)
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))
    ours = backbone(x)
    theirs = ref(x)
    return max(float((ours[f"res{i + 2}"] - t).abs().max()) for i, t in enumerate(theirs))

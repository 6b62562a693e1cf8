"""Shared pieces of the evaluation protocols: loading encoder weights with clear errors,
split files, results.json, the frozen-encoder sanity check, top-k accuracy."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, describe_file, first_non_finite
from ..export import DEFAULT_OUT, is_safetensors, load_exported_encoder, meta_path


class EvalInputError(ValueError):
    """Bad evaluation input (weights, split file); one line saying what to pass."""


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_encoder(weights: str | Path, arch: Optional[str] = None) -> tuple[nn.Module, dict]:
    """Build the timm encoder named by the weights' metadata (or ``arch``) and load them strictly.

    Args:
        weights: an encoder from ``m2-pretrain export`` (``.safetensors``, or ``.pth`` with its
            ``.json`` sidecar), or a plain timm state_dict with ``arch``.
        arch: timm architecture; overrides the metadata's.

    Raises:
        EvalInputError: the file is missing, a training checkpoint, a Detectron2 .pkl, not a
            state_dict, holds NaN/inf values, or does not match the architecture.
    """
    path = Path(weights)
    if not path.is_file():
        raise EvalInputError(f"weights file not found: {path}")
    try:
        sd, meta = load_exported_encoder(path)
    except CheckpointError as e:
        text = str(e)
        if "is not a loadable PyTorch checkpoint" in text or "already a Detectron2" in text:
            text = (f"{path} is {describe_file(path)}; pass an encoder exported by "
                    f"`m2-pretrain export CKPT --out {DEFAULT_OUT}`")
        raise EvalInputError(text) from None
    meta = meta or {}
    where = "its metadata" if is_safetensors(path) else meta_path(path).name
    arch = arch or meta.get("arch")
    if not arch:
        raise EvalInputError(f"{path} has no {where}: pass the architecture (--arch)")
    if not timm.is_model(str(arch).split(".")[0]):
        raise EvalInputError(f"unknown timm architecture {arch!r} (from --arch or {where}); "
                             "see timm.list_models()")
    encoder = timm.create_model(arch, num_classes=0, pretrained=False)
    try:
        missing, unexpected = encoder.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e))
        raise EvalInputError(f"{path} does not match timm '{arch}': {first}") from None
    if missing or unexpected:
        raise EvalInputError(
            f"{path} does not match timm '{arch}': {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return encoder, {**meta, "arch": arch}


def check_finite(what: str, named, hint: str) -> None:
    """Raise ``EvalInputError`` naming the first NaN/inf tensor of ``named`` ((name, tensor)
    pairs): no accuracy is reported for a broken model."""
    bad = first_non_finite(named)
    if bad is not None:
        raise EvalInputError(f"{what}: {bad} holds NaN or inf values; no result is reported "
                             f"({hint})")


def read_split_file(path: str | Path, dataset) -> list[int]:
    """Indices of ``dataset`` named in a split file (one image path or file name per line,
    as in the SimCLR 1%/10% ImageNet lists; matched by file name).

    Raises:
        EvalInputError: listing the first few names that are not in the dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"split file not found: {path}")
    if not hasattr(dataset, "image_name"):
        raise EvalInputError(f"dataset {type(dataset).__name__} has no image names for split files")
    wanted = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not wanted:
        raise EvalInputError(f"split file {path} is empty")
    index = {dataset.image_name(i): i for i in range(len(dataset))}
    found, missing = [], []
    for w in wanted:
        name = w.replace("\\", "/").rsplit("/", 1)[-1]
        (found.append(index[name]) if name in index else missing.append(w))
    if missing:
        raise EvalInputError(
            f"{len(missing)} of {len(wanted)} images in {path} are not in the dataset, e.g. "
            + ", ".join(missing[:5]))
    return found


def encoder_fingerprint(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer (BN statistics included)."""
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def sanity_check_frozen(encoder: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Raise if any encoder weight or BN statistic changed (MoCo v3's ``sanity_check``)."""
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v.cpu(), before[k].cpu())]
    if changed:
        raise RuntimeError(
            f"frozen-encoder sanity check failed: {len(changed)} tensors changed, e.g. {changed[:5]}")


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == target.unsqueeze(1)
    return [int(hit[:, : min(k, maxk)].any(1).sum()) for k in ks]


def write_results(out_dir: str | Path, protocol: str, numbers: dict, weights: str | Path,
                  cfg_dict: dict, extra: Optional[dict] = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "protocol": protocol,
        "results": numbers,
        "command": " ".join(sys.argv),
        "weights": str(Path(weights).resolve()),
        "weights_sha256": sha256_of(weights),
        "config": cfg_dict,
    }
    if extra:
        payload.update(extra)
    path = out / "results.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


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

from ..checkpoint import CheckpointError, atomic_write, describe_file, first_non_finite
from ..export import DEFAULT_OUT, META_KEY, is_safetensors, load_exported_encoder, meta_path


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
            ``.json`` sidecar), or a plain timm state_dict with ``arch``; a ``file://`` URL
            is read as the local path.
        arch: timm architecture; overrides the metadata's.

    Raises:
        EvalInputError: the file is missing, a training checkpoint, a Detectron2 .pkl, not a
            state_dict, holds NaN/inf values, or does not match the architecture.
    """
    path = local_path(weights)
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
    where = (f"its header key {META_KEY!r}" if is_safetensors(path)
             else f"its sidecar {meta_path(path).name}")
    if not arch and meta is None:
        raise EvalInputError(f"{path} has no metadata ({where} is absent): pass the "
                             "architecture (--arch)")
    meta = meta or {}
    arch = arch or meta.get("arch")
    if not arch:
        raise EvalInputError(f"{path}: the metadata in {where} has no 'arch': pass the "
                             "architecture (--arch)")
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
    """Indices of ``dataset`` named in a split file, one image per line.

    For a dataset of folders (``image_relpath``), a line with a ``/`` names an image by its
    path relative to the split folder (``<class>/<file>``); a longer path ending in one
    (``train/<class>/<file>``, an absolute path) is accepted. A line without ``/`` is a file
    name, as in the SimCLR 1%/10% ImageNet lists, and must name exactly one image of the
    dataset. Datasets without folders match the last part of each line against their
    (unique) image names.

    Raises:
        EvalInputError: listing the first few lines that name no image, or a file name that
            names several images.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"split file not found: {path}")
    if not hasattr(dataset, "image_name"):
        raise EvalInputError(f"dataset {type(dataset).__name__} has no image names for split files")
    wanted = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not wanted:
        raise EvalInputError(f"split file {path} is empty")
    folders = hasattr(dataset, "image_relpath")
    relpath = dataset.image_relpath if folders else dataset.image_name
    by_path: dict[str, int] = {}
    by_name: dict[str, list[int]] = {}
    for i in range(len(dataset)):
        by_path[relpath(i)] = i
        by_name.setdefault(dataset.image_name(i), []).append(i)
    found, missing = [], []
    for w in wanted:
        parts = w.replace("\\", "/").split("/")
        if len(parts) == 1 or not folders:  # without folders, names are unique
            hits = by_name.get(parts[-1], [])
            if len(hits) > 1:
                names = ", ".join(relpath(i) for i in hits[:3])
                raise EvalInputError(f"{path}: {parts[-1]!r} names {len(hits)} images ({names}); "
                                     "write each image's path relative to the split folder "
                                     "instead")
            (found.append(hits[0]) if hits else missing.append(w))
            continue
        hit = next((by_path[k] for j in range(len(parts) - 1)
                    if (k := "/".join(parts[j:])) in by_path), None)
        (found.append(hit) if hit is not None else missing.append(w))
    if missing:
        raise EvalInputError(
            f"{len(missing)} of {len(wanted)} images in {path} are not in the dataset, e.g. "
            + ", ".join(missing[:5]))
    return found


def split_classes(train) -> Optional[list[str]]:
    """The class list every split's labels are numbered by: the training split's folder
    names, for datasets that have them (None for datasets with fixed labels)."""
    return getattr(train, "classes", None)


def num_classes_of(train, *others) -> int:
    """Number of classes: the training split's class list where it has one, else one more
    than the largest label of any split."""
    classes = split_classes(train)
    if classes is not None:
        return len(classes)
    return int(max(max(d.targets) for d in (train, *others))) + 1


def class_coverage(train, val) -> dict:
    """What results.json states about the splits' classes: the training split's classes that
    the evaluation split lacks (accuracy is then over the classes it has)."""
    missing = list(getattr(val, "missing_classes", []))
    out = {"num_classes": num_classes_of(train, val)}
    if missing:
        out["classes_missing_from_val"] = missing
    return out


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


def results_path(out_dir: str | Path, overwrite: bool = False) -> Path:
    """``out_dir/results.json``, checked before anything is evaluated: an existing result is
    replaced only with ``overwrite`` (``--force``), as ``m2-pretrain export`` does.

    Raises:
        EvalInputError: ``out_dir`` is a file, or the result exists and ``overwrite`` is off.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvalInputError(f"--output-dir {out} is a file; name a directory")
    path = out / "results.json"
    if path.exists() and not overwrite:
        raise EvalInputError(f"{path} already exists; choose another --output-dir or pass "
                             "--force to replace it")
    return path


def local_path(weights: str | Path) -> Path:
    """``file://`` weights as a plain path; anything else as given."""
    text = str(weights)
    if text.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(text).path))
    return Path(weights)


def write_results(out_dir: str | Path, protocol: str, numbers: dict, weights: str | Path,
                  cfg_dict: dict, extra: Optional[dict] = None, overwrite: bool = False) -> Path:
    """Write ``out_dir/results.json`` (protocol, numbers, command, weights and their sha256,
    config) atomically; an existing file only with ``overwrite`` (see :func:`results_path`)."""
    path = results_path(out_dir, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "protocol": protocol,
        "results": numbers,
        "command": " ".join(sys.argv),
        "weights": str(local_path(weights).resolve()),
        "weights_sha256": sha256_of(local_path(weights)),
        "config": cfg_dict,
    }
    if extra:
        payload.update(extra)
    text = json.dumps(payload, indent=2).encode()
    atomic_write(path, lambda f: f.write(text))
    return path

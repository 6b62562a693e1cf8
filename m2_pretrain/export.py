"""Training checkpoint -> timm encoder weights with their metadata.

Two formats, chosen by the output's suffix:

- ``.safetensors`` (the default): timm's own format; the metadata travels in the file's header
  as JSON under :data:`META_KEY`, and ``timm.create_model(arch, pretrained=True,
  pretrained_cfg_overlay=dict(file=path), num_classes=0)`` loads it.
- anything else (``.pth``): a ``torch.save`` state_dict plus the metadata in ``<out>.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import (
    CKPT_RE,
    CheckpointError,
    atomic_write,
    first_non_finite,
    is_training_checkpoint,
    safe_load,
)

# Header metadata key of an exported ``.safetensors`` file: ``json.dumps`` of the metadata.
META_KEY = "m2_teacher"
DEFAULT_OUT = "encoder.safetensors"

# Momentum BN bookkeeping that a plain timm BatchNorm does not have.
_MOMENTUM_BN_ONLY = ("alpha",)
# Per-group (virtual device) running statistics have shape (G, C); row 0 is rank 0's.
_PER_GROUP_STATS = ("running_mean", "running_var")


def default_branch(ckpt: dict) -> str:
    """The branch to export by default, as the method declares it (``export_branch`` in the
    metadata; checkpoints from before it: M2's teacher, MoCo's query encoder)."""
    meta = ckpt.get("meta", {})
    if "export_branch" in meta:
        return meta["export_branch"]
    return "student" if meta.get("method") == "mocov2" else "teacher"


def encoder_state_from_checkpoint(ckpt: dict, which: str | None = None) -> dict[str, torch.Tensor]:
    """The ``which`` branch's encoder weights with timm's names (no heads, no Momentum BN state).
    ``which=None`` picks ``default_branch``. Per-group BN statistics (``train.bn_group_size``)
    are exported as group 0's: what rank 0 saves in a real multi-GPU run."""
    if not is_training_checkpoint(ckpt):
        raise CheckpointError("not a training checkpoint (expected keys student and config)")
    which = which or default_branch(ckpt)
    if not isinstance(ckpt.get(which), dict):
        parts = sorted(k for k, v in ckpt.items() if isinstance(v, dict)
                       and any(str(n).startswith("encoder.") for n in v))
        raise CheckpointError(f"this {ckpt.get('meta', {}).get('method', '')} checkpoint has "
                              f"no '{which}' branch; choose --which {' or '.join(parts)}")
    prefix = "encoder."
    out = {}
    for k, v in ckpt[which].items():
        if not k.startswith(prefix):
            continue  # projector
        name = k[len(prefix):]
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _MOMENTUM_BN_ONLY:
            continue
        if leaf in _PER_GROUP_STATS and v.dim() == 2:
            v = v[0].clone()
        out[name] = v
    if not out:
        raise CheckpointError(f"checkpoint has no '{which}' encoder weights")
    return out


def meta_path(out: str | Path) -> Path:
    """The metadata sidecar of a ``.pth`` encoder: ``<out>.json``."""
    return Path(str(out) + ".json")


def is_safetensors(path: str | Path) -> bool:
    """True when ``path`` is named ``*.safetensors`` or starts like one (an 8-byte header
    length, then the JSON header)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def output_files(out: str | Path) -> list[Path]:
    """Every file an export to ``out`` writes: the weights, and for ``.pth`` the sidecar."""
    out = Path(out)
    return [out] if out.suffix == ".safetensors" else [out, meta_path(out)]


def check_output_file(src: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Refuse to write ``out`` (or its ``.json`` sidecar) over its own input, under a training
    checkpoint's name, or over any existing file unless ``overwrite``.

    Raises:
        CheckpointError: saying which and what to pass instead.
    """
    if str(out).endswith(("/", os.sep)):  # Path() would drop the slash and write a file
        raise CheckpointError(f"--out {out} names a directory; name a file in it instead "
                              f"(e.g. {Path(out) / DEFAULT_OUT})")
    src, out = Path(src), Path(out)
    targets = output_files(out)
    for target in targets:
        if target.is_dir():
            raise CheckpointError(f"--out {target} is a directory; name a file in it instead")
        if target.exists() and src.exists() and target.samefile(src):
            raise CheckpointError(f"--out {target} is the input file itself; choose another "
                                  "file name")
    if CKPT_RE.match(out.name):
        raise CheckpointError(f"--out {out} is named like a training checkpoint (ckpt_*.pth), "
                              "a name checkpoint rotation may delete; choose another file name")
    if out.parent.exists() and not out.parent.is_dir():
        raise CheckpointError(f"--out {out}: {out.parent} is not a directory")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]} already exists; choose another --out or pass "
                              "--force to replace it")


def export_encoder(ckpt_path: str | Path, out: str | Path, which: str | None = None,
                   overwrite: bool = False) -> dict:
    """Write the encoder of a training checkpoint as timm weights with their metadata.

    ``out`` ending in ``.safetensors`` gets timm's safetensors format with the metadata in its
    header; any other name a ``torch.save`` state_dict plus ``out + '.json'``. Either loads with
    ``strict=True`` into ``timm.create_model(arch, num_classes=0)``. Every file is written to a
    temporary name and renamed, so an interrupted export leaves any old file intact.

    Args:
        ckpt_path: a training checkpoint.
        out: the encoder file to write; never the checkpoint itself or another checkpoint.
        which: teacher|student (None: the method's default branch).
        overwrite: replace an existing ``out`` or sidecar (``--force``).

    Returns:
        The metadata dict.

    Raises:
        CheckpointError: unusable input or output, or a weight or statistic that is NaN/inf.
    """
    check_output_file(ckpt_path, out, overwrite)
    ckpt = safe_load(ckpt_path)
    which = which or default_branch(ckpt)
    sd = encoder_state_from_checkpoint(ckpt, which)
    bad = first_non_finite(sd.items())
    if bad is not None:
        raise CheckpointError(f"{ckpt_path}: {which} tensor {bad} holds NaN or inf values; "
                              "refusing to export a broken encoder (export an earlier checkpoint)")
    meta = dict(ckpt.get("meta", {}))
    meta.update({"which": which, "step": int(ckpt.get("step", -1)),
                 "total_steps": int(ckpt.get("total_steps", -1)),
                 "source": str(Path(ckpt_path).resolve()), "format": "timm_state_dict"})
    if int(meta.get("bn_groups", 1)) > 1:
        meta["bn_statistics"] = (f"group 0 of {meta['bn_groups']} virtual devices "
                                 "(what rank 0 saves in a multi-GPU run)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save as to_safetensors

        data = to_safetensors({k: v.detach().clone().contiguous() for k, v in sd.items()},
                              metadata={META_KEY: json.dumps(meta)})
        atomic_write(out, lambda f: f.write(data))
    else:
        atomic_write(out, lambda f: torch.save(sd, f))
        text = json.dumps(meta, indent=2).encode()
        atomic_write(meta_path(out), lambda f: f.write(text))
    return meta


def _read_meta_json(text: str, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: the encoder metadata is not valid JSON ({e.msg}, "
                              f"character {e.pos}); export the encoder again") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: the encoder metadata is not a JSON object; export the "
                              "encoder again")
    return meta


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    from safetensors import SafetensorError, safe_open

    try:
        sd, header = {}, None
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is not a readable safetensors file ({first})") from None
    meta = None
    if META_KEY in header:
        meta = _read_meta_json(header[META_KEY], f"{path} (header key {META_KEY!r})")
    return sd, meta


def load_exported_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(state_dict, metadata or None) of an exported encoder.

    A ``.safetensors`` file carries its metadata in the header (key :data:`META_KEY`); a
    ``.pth`` file in the ``<path>.json`` sidecar.

    Raises:
        CheckpointError: the file is missing, a training checkpoint, not a state_dict of
            tensors, holds a NaN/inf tensor, or its metadata is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder file not found: {path}")
    if is_safetensors(path):
        sd, meta = _load_safetensors(path)
    else:
        sd = safe_load(path)
        meta = None
        if is_training_checkpoint(sd):
            raise CheckpointError(
                f"{path} is a full training checkpoint; export the encoder first: "
                f"m2-pretrain export {path} --out {DEFAULT_OUT}")
        mp = meta_path(path)
        if mp.is_file():
            meta = _read_meta_json(mp.read_text(errors="replace"), str(mp))
    if (not isinstance(sd, dict) or not sd
            or not all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise CheckpointError(f"{path} is not an encoder state_dict (a dict of tensors)")
    bad = first_non_finite(sd.items())
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad} holds NaN or inf values; a broken encoder "
                              "gives no meaningful number")
    return sd, meta

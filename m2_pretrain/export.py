"""Training checkpoint -> plain timm encoder state_dict (+ metadata sidecar)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .engine.checkpoint import CKPT_RE, CheckpointError, atomic_save, safe_load

# Momentum BN bookkeeping that a plain timm BatchNorm does not have.
_MOMENTUM_BN_ONLY = ("alpha",)
# Per-group (virtual device) running statistics have shape (G, C); row 0 is rank 0's.
_PER_GROUP_STATS = ("running_mean", "running_var")


def is_training_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and {"student", "teacher", "config"} <= set(obj)


def default_branch(ckpt: dict) -> str:
    """The branch to export by default: M2's teacher (as the paper does), MoCo's query encoder."""
    return "student" if ckpt.get("meta", {}).get("method") == "mocov2" else "teacher"


def encoder_state_from_checkpoint(ckpt: dict, which: str | None = None) -> dict[str, torch.Tensor]:
    """The ``which`` branch's encoder weights with timm's names (no heads, no Momentum BN state).
    ``which=None`` picks ``default_branch``. Per-group BN statistics (``train.bn_group_size``)
    are exported as group 0's: what rank 0 saves in a real multi-GPU run."""
    which = which or default_branch(ckpt)
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if not is_training_checkpoint(ckpt):
        raise CheckpointError("not a training checkpoint (expected keys student, teacher, config)")
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
    return Path(str(out) + ".json")


def check_output_file(src: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Refuse to write ``out`` over its own input, over a training checkpoint, or over any
    existing file unless ``overwrite``.

    Raises:
        CheckpointError: saying which and what to pass instead.
    """
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise CheckpointError(f"--out {out} is a directory; name a file in it instead")
    if not out.exists():
        return
    if src.exists() and out.samefile(src):
        raise CheckpointError(f"--out {out} is the input file itself; choose another file name")
    if CKPT_RE.match(out.name):
        raise CheckpointError(f"--out {out} is a training checkpoint; choose another file name")
    if not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --force to "
                              "replace it")


def export_encoder(ckpt_path: str | Path, out: str | Path, which: str | None = None,
                   overwrite: bool = False) -> dict:
    """Write ``out`` (a plain state_dict loadable with ``strict=True`` into
    ``timm.create_model(arch, num_classes=0)``) and ``out + '.json'`` with its metadata.

    Args:
        ckpt_path: a training checkpoint.
        out: the encoder file to write; never the checkpoint itself or another checkpoint.
        which: teacher|student (None: the method's default branch).
        overwrite: replace an existing ``out`` (``--force``).

    Returns:
        The metadata dict.
    """
    check_output_file(ckpt_path, out, overwrite)
    ckpt = safe_load(ckpt_path)
    which = which or default_branch(ckpt)
    sd = encoder_state_from_checkpoint(ckpt, which)
    meta = dict(ckpt.get("meta", {}))
    meta.update({"which": which, "step": int(ckpt.get("step", -1)),
                 "total_steps": int(ckpt.get("total_steps", -1)),
                 "source": str(Path(ckpt_path).resolve()), "format": "timm_state_dict"})
    if int(meta.get("bn_groups", 1)) > 1:
        meta["bn_statistics"] = (f"group 0 of {meta['bn_groups']} virtual devices "
                                 "(what rank 0 saves in a multi-GPU run)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(sd, out)
    with open(meta_path(out), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def load_exported_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(state_dict, metadata or None) of an exported encoder: a ``.safetensors`` file (metadata
    JSON-encoded under the header key ``m2_teacher``) or a ``.pth`` with its ``.json`` sidecar."""
    if str(path).endswith(".safetensors"):
        return _load_safetensors_encoder(path)
    sd = safe_load(path)
    if is_training_checkpoint(sd):
        raise CheckpointError(
            f"{path} is a full training checkpoint; export the encoder first: "
            f"m2-pretrain export {path} --out encoder.pth")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not an encoder state_dict (a dict of tensors)")
    mp = meta_path(path)
    meta = json.loads(mp.read_text()) if mp.is_file() else None
    return sd, meta


def _load_safetensors_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - header or data not readable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is not a readable safetensors file ({first})") from None
    if not sd:
        raise CheckpointError(f"{path} holds no tensors")
    meta = None
    if "m2_teacher" in header:
        try:
            meta = json.loads(header["m2_teacher"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: its m2_teacher metadata is not valid JSON "
                                  f"({e})") from None
    return sd, meta

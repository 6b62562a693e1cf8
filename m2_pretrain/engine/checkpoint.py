"""Atomic checkpoints, keep-last-K rotation, safe loading, RNG state capture."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says what was found."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU with a one-line error for unusable files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a loadable PyTorch checkpoint: {first}") from None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """``ckpt_XXXXXXXX.pth`` files in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt_{step:08d}.pth"


def save_rotating(obj: Any, folder: str | Path, step: int, keep_last: int) -> Path:
    """Save ``ckpt_<step>.pth`` atomically and delete all but the newest ``keep_last``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, step)
    atomic_save(obj, path)
    for old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def latest_loadable(folder: str | Path) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint in ``folder`` that loads, with its content; None if none does."""
    for p in reversed(list_checkpoints(folder)):
        try:
            return p, safe_load(p)
        except CheckpointError as e:
            logger.warning("ignoring unreadable checkpoint: %s", e)
    return None


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

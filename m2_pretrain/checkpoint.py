"""Atomic checkpoints, keep-last-K rotation, safe loading, RNG state capture."""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pth$")
# Temporary files of ``atomic_save`` for checkpoints: ``.ckpt_XXXXXXXX.pth.tmp.<pid>``.
TMP_RE = re.compile(r"^\.ckpt_\d{8}\.pth\.tmp\.(\d+)$")
# How much of a file's start and end ``describe_file`` reads (never unpickles).
_PROBE_BYTES = 1 << 20
D2_WEIGHTS = "a Detectron2 weights file (.pkl)"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says what was found."""


# The key the trainer writes into every checkpoint (its value: the format version). ``--resume``
# considers only files whose content says the trainer wrote them, whatever their name.
CHECKPOINT_MARKER = "m2_pretrain_checkpoint"
CHECKPOINT_FORMAT = 1
# What every checkpoint the trainer writes holds, whatever the method (all of it is needed to
# resume; the method's other parts are checked by the trainer, which knows them).
_RESUME_KEYS = ("student", "config", "optimizer", "step", "rng")


def is_training_checkpoint(obj: Any) -> bool:
    """True for anything shaped like a full training checkpoint (a ``student`` branch, whatever
    other branches the method saves, and the config): the file to export an encoder from, not
    an encoder."""
    return (isinstance(obj, dict) and {"student", "config"} <= set(obj)
            and isinstance(obj["student"], dict))


def newer_format(obj: Any) -> Optional[int]:
    """The format version of a checkpoint written by a newer trainer than this one (which
    reads :data:`CHECKPOINT_FORMAT` and older), or None."""
    if not isinstance(obj, dict):
        return None
    version = obj.get(CHECKPOINT_MARKER)
    if isinstance(version, int) and not isinstance(version, bool) and version > CHECKPOINT_FORMAT:
        return version
    return None


def resume_problem(obj: Any) -> Optional[str]:
    """Why ``--resume`` cannot continue from ``obj``, or None: it must be a dict holding every
    part the trainer restores (weights, config, optimizer state, step, RNG state)."""
    if not isinstance(obj, dict):
        return "not a checkpoint written by the trainer"
    missing = [k for k in _RESUME_KEYS if k not in obj]
    if CHECKPOINT_MARKER not in obj and len(missing) > 1:
        return ("not a checkpoint written by the trainer (an exported encoder or another file "
                "under a checkpoint's name?)")
    if missing:
        return f"it lacks {', '.join(missing)}, which resuming restores"
    if not isinstance(obj["config"], dict) or not isinstance(obj["rng"], dict):
        return "its config or RNG state is not a mapping"
    return None


def is_resumable_checkpoint(obj: Any) -> bool:
    """True when ``obj`` is a checkpoint the trainer wrote, of this format or older, with every
    part ``--resume`` restores (see :func:`resume_problem`)."""
    return newer_format(obj) is None and resume_problem(obj) is None


def first_non_finite(named: Iterable[tuple[str, Any]]) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, t in named:
        if (isinstance(t, torch.Tensor) and t.is_floating_point()
                and not bool(torch.isfinite(t).all())):
            return name
    return None


def checkpoint_tensors(ckpt: dict) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor a training checkpoint resumes from: the method's
    parts (every state-dict entry), the model's own buffers and the optimizer state."""
    for part, sd in ckpt.items():
        if part not in ("optimizer", "config", "meta", "rng") and isinstance(sd, dict):
            for k, v in sd.items():
                yield f"{part}.{k}", v
    opt = ckpt.get("optimizer") or {}
    for i, state in (opt.get("state") or {}).items():
        for k, v in state.items():
            yield f"optimizer.state.{i}.{k}", v


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, fsync, then rename it over
    ``path``.

    A crash at any point leaves either the old file or the new one, never a partial one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        full = _disk_full(path.parent, e)
        if full is None:
            raise
        raise CheckpointError(f"cannot write {path}: {full}; free space there (or choose "
                              "another output folder) and run again: no existing file was "
                              "replaced") from None
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


def _disk_full(folder: Path, e: BaseException) -> Optional[str]:
    """"the disk holding FOLDER is full (N MiB free)" when ``e`` is a write that failed for
    lack of space (ENOSPC/EDQUOT, or torch's writer failing with under 1 MiB left), else None."""
    try:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    no_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not no_space and not (free is not None and free < 1 << 20 and "write" in str(e).lower()):
        return None
    room = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
    return f"the disk holding {folder} is full{room}"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write` (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def describe_file(path: str | Path) -> str:
    """What a file that ``torch.load(weights_only=True)`` refused is, without unpickling it.

    Reads only the first and last MiB. Returns a phrase such as "a Detectron2 weights file
    (.pkl)", "a plain pickle" or "not a PyTorch file".
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_PROBE_BYTES)
        tail = b""
        if size > _PROBE_BYTES:
            f.seek(max(size - _PROBE_BYTES, _PROBE_BYTES))
            tail = f.read()
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip container
        return "a PyTorch file that does not load with weights_only=True"
    if not head.startswith(b"\x80"):  # pickle protocol >= 2 marker
        return "not a PyTorch file"
    # Detectron2's keys are pickled after the weights: they sit at the end of a large file.
    if any(m in head or m in tail for m in (b"matching_heuristics", b"__author__")):
        return D2_WEIGHTS
    return "a plain pickle"


# Sentences of torch.load's error that advise loading the file anyway (``weights_only=False``
# or allowlisting the file's globals): dropped, since either runs whatever code the file holds.
_UNSAFE_ADVICE = ("weights only load failed", "weights_only", "safe_globals",
                  "check the documentation", "alternatively,", "trust")


def torch_load_restricted(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, torch's protocol warning silenced:
    tensors and plain containers only, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says (it
    only changes the default). Errors pass through; :func:`refusal_reason` words them."""
    with warnings.catch_warnings():  # torch warns about the protocol of plain pickles
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        return torch.load(path, map_location="cpu", weights_only=True)


def refusal_reason(e: BaseException) -> str:
    """The useful part of a torch.load error, on one line, without torch's advice to retry with
    ``weights_only=False`` or to allowlist globals (either would run the file's code)."""
    text = str(e).replace("WeightsUnpickler error:", "\n")
    parts = []
    for line in text.splitlines():
        for sentence in re.split(r"(?<=\.)\s+", line.strip()):
            sentence = re.sub(r"\x1b\[[0-9;]*m", "", sentence).strip()
            if sentence and not any(a in sentence.lower() for a in _UNSAFE_ADVICE):
                parts.append(sentence)
    reason = parts[0].rstrip(".") if parts else ""
    return reason or "it holds objects other than tensors and plain containers"


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU with a one-line error for unusable files.

    Raises:
        CheckpointError: the file is missing or not a PyTorch checkpoint of tensors and plain
            containers; the message says what the file is (e.g. a Detectron2 ``.pkl``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch_load_restricted(path)
    except Exception as e:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        what = describe_file(path)
        if what == D2_WEIGHTS:
            raise CheckpointError(
                f"{path} is already a Detectron2 weights file (.pkl), not a PyTorch checkpoint: "
                "pass it to Detectron2 as MODEL.WEIGHTS") from None
        reason = refusal_reason(e)
        raise CheckpointError(f"{path} is not a loadable PyTorch checkpoint ({what}; "
                              f"torch.load(weights_only=True) says: {reason})") from None


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


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete ``.ckpt_*.pth.tmp.<pid>`` files left by a save that was killed mid-write.

    Call it only while holding the folder's run lock (no other process saves there). Files
    of a process that is still alive on this machine are kept. Returns the deleted paths.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TMP_RE.match(p.name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        size = p.stat().st_size
        p.unlink(missing_ok=True)
        removed.append(p)
        logger.warning("removed %s (%.1f MB) left by an interrupted checkpoint save", p,
                       size / 2**20)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


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

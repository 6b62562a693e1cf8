"""The output directory of a pretraining run: one run per directory, one process at a time,
and a resume that continues the same experiment.

- :func:`claim_output_dir` refuses a path that is a file, a fresh run in a directory that
  already holds a run (checkpoints or ``config.yaml``: keep-last rotation would delete the
  other run's checkpoints), and a second process on the same directory (an advisory
  ``flock`` on ``DIR/.m2_run.lock``, released by the OS when the process ends, ``kill -9``
  included). It removes temporary files of checkpoint saves that were killed mid-write.
- :func:`find_resume_checkpoint` takes the newest checkpoint the trainer wrote (judged by its
  content, not its name) whose state is finite, names every file it skips, and refuses to
  start from scratch when none is left.
- :func:`check_resume_config` refuses a resume whose config differs from the checkpoint's,
  except for the keys in :data:`RESUME_CHANGEABLE_KEYS` (or any non-model key when the user
  passes ``--resume-allow-changes``); every change is logged.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import Config, config_from_dict
from ..checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_tensors,
    first_non_finite,
    list_checkpoints,
    newer_format,
    remove_stale_temp_files,
    resume_problem,
    safe_load,
)

logger = logging.getLogger(__name__)

LOCK_NAME = ".m2_run.lock"

# Config keys that may differ between a checkpoint and the run that resumes it: they change
# how long the run goes, what is logged and how data is fed, not what is learnt per step.
# ``section.*`` means every key of the section. Extend this tuple for new keys of that kind.
RESUME_CHANGEABLE_KEYS: tuple[str, ...] = (
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.compile",
    "data.workers",
    "data.pin_memory",
    "data.skip_corrupt",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "knn.*",
    "eval.*",
)

# Keys that never change on resume, not even with --resume-allow-changes (the weights would
# not load into another model).
RESUME_FIXED_SECTIONS: tuple[str, ...] = ("model",)


class RunDirError(RuntimeError):
    """An output directory that cannot be used for this run; the message says what to do."""


class ResumeConfigError(RunDirError):
    """``--resume`` with a config that differs from the checkpoint's in a key that matters."""


# ----------------------------------------------------------------------------- lock
_HELD: dict[str, list] = {}  # resolved directory -> [fd, holders in this process]


class RunLock:
    """An exclusive advisory lock on a run directory, shared by the holders of one process.

    Released by :meth:`release`, when the object is garbage collected, or by the OS when the
    process ends (``kill -9`` included), so an interrupted run can always be resumed.
    """

    def __init__(self, folder: Path) -> None:
        self.key = str(folder.resolve())
        self.path = folder / LOCK_NAME
        self._released = False
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, say so once
            logger.warning("no file locking on this platform: nothing stops a second run from "
                           "writing to %s", folder)
            _HELD[self.key] = [None, 1]
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirError(
                f"another run ({holder}) is writing to {folder}; wait for it to finish or "
                "choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        _HELD[self.key] = [fd, 1]

    def release(self) -> None:
        """Give the lock up (once); the last holder in the process unlocks the directory."""
        if self._released:
            return
        self._released = True
        entry = _HELD.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.key]
            if entry[0] is not None:
                os.close(entry[0])  # closing the descriptor drops the flock

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def claim_output_dir(folder: str | Path, resume: bool, is_main: bool = True) -> Optional[RunLock]:
    """Check and lock a run's output directory before anything is written there.

    Args:
        folder: the ``--output-dir``.
        resume: the run continues from the directory's checkpoints (``--resume``).
        is_main: only the main process creates, locks and cleans the directory.

    Returns:
        The lock (None on other ranks); keep it for as long as the run may write.

    Raises:
        RunDirError: ``folder`` is a file or cannot be created, another process holds it, or a
            fresh run would overwrite another run's checkpoints and config.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"--output-dir {folder} is a file, not a directory; choose a directory")
    if not is_main:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create --output-dir {folder}: {e.strerror or e}") from None
    lock = RunLock(folder)
    try:
        remove_stale_temp_files(folder)
        if not resume:
            found = list_checkpoints(folder)
            if found or (folder / "config.yaml").exists():
                held = (f"{len(found)} checkpoint(s), newest {found[-1].name}" if found
                        else "config.yaml")
                raise RunDirError(
                    f"{folder} already holds a run ({held}); continue it with --resume, or "
                    "choose a new --output-dir (nothing was changed)")
    except BaseException:
        lock.release()
        raise
    return lock


# ----------------------------------------------------------------------------- resume
def find_resume_checkpoint(folder: str | Path,
                           reject: Optional[Callable[[dict], Optional[str]]] = None,
                           ) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint of ``folder`` that ``--resume`` can continue from (None when the
    folder has no checkpoint at all).

    A file named like a checkpoint is skipped, with a warning naming it and why, when it does
    not load, was not written by the trainer (judged by its content, e.g. an exported encoder
    under a checkpoint's name), lacks a part resuming restores (optimizer or RNG state),
    holds a NaN/inf tensor, or ``reject(ckpt)`` returns a reason.

    Raises:
        RunDirError: checkpoints exist but none can be resumed (starting from scratch would let
            the keep-last rotation delete them), or the newest readable one was written in a
            newer checkpoint format (resuming an older one would silently drop its progress).
    """
    present = list_checkpoints(folder)
    skipped = []
    for path in reversed(present):
        try:
            ckpt = safe_load(path)
        except CheckpointError as e:
            reason = f"unreadable: {e}"
        else:
            if (version := newer_format(ckpt)) is not None:
                raise RunDirError(
                    f"--resume: {path} was written by a newer m2-pretrain (checkpoint format "
                    f"{version}; this version reads up to {CHECKPOINT_FORMAT}): resume it with "
                    "that version, or upgrade")
            if (problem := resume_problem(ckpt)) is not None:
                reason = problem
            elif (bad := first_non_finite(checkpoint_tensors(ckpt))) is not None:
                reason = f"{bad} holds NaN or inf values"
            else:
                reason = reject(ckpt) if reject is not None else None
            if reason is None:
                return path, ckpt
        logger.warning("--resume: skipping %s: %s", path, reason)
        skipped.append(f"{path.name}: {reason}")
    if present:
        raise RunDirError(
            f"--resume: none of the {len(present)} checkpoint(s) in {folder} loads as a sound "
            f"training checkpoint ({'; '.join(skipped[:3])}); move them elsewhere to start "
            "afresh there, or choose a new --output-dir")
    return None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changeable(key: str, allowed: tuple[str, ...]) -> bool:
    section = key.split(".", 1)[0]
    return key in allowed or f"{section}.*" in allowed


def config_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every key whose value differs."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(saved: dict, current: Config, source: str | Path,
                        allow_changes: bool = False,
                        changeable: tuple[str, ...] = RESUME_CHANGEABLE_KEYS) -> list:
    """Compare a checkpoint's config with the resuming run's; log and return the changes.

    Args:
        saved: the checkpoint's ``config`` dict.
        current: the resuming run's config.
        source: the checkpoint path (for messages).
        allow_changes: accept changes outside ``changeable`` (``--resume-allow-changes``);
            ``model.*`` must still match.
        changeable: keys (``section.key`` or ``section.*``) that may change freely.

    Raises:
        ResumeConfigError: a key outside ``changeable`` differs (or a ``model`` key at all).
    """
    try:
        old = config_from_dict(saved)
    except Exception as e:  # noqa: BLE001 - a config this version cannot read
        raise CheckpointError(f"{source}: its config cannot be read by this version: {e}") from None
    changes = config_changes(old, current)

    def show(items):
        text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in items[:4])
        return text + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

    fixed = [c for c in changes if c[0].split(".", 1)[0] in RESUME_FIXED_SECTIONS]
    if fixed:
        raise ResumeConfigError(
            f"{source}: the model config differs from the checkpoint's ({show(fixed)}); resume "
            "with the same model settings or choose a new --output-dir")
    blocked = [c for c in changes if not _changeable(c[0], changeable)]
    if blocked and not allow_changes:
        raise ResumeConfigError(
            f"{source}: the config differs from the checkpoint's ({show(blocked)}); resume with "
            "the same settings, choose a new --output-dir, or pass --resume-allow-changes")
    for key, a, b in changes:
        logger.warning("resume: %s changed from %r to %r", key, a, b)
    return changes

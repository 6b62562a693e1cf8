"""The training device and torch.distributed set-up from torchrun's or SLURM's environment, and
the stop decision that all processes agree on."""

from __future__ import annotations

import logging
import os
import re
import signal
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config, ConfigError

logger = logging.getLogger(__name__)

# Signals that make a run checkpoint after the step all its processes agree on, then stop:
# SIGTERM (preemption, scancel, the time limit), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning
# before the time limit, `#SBATCH --signal=B:USR1@<s>`).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1")
                     if hasattr(signal, n))
# Exit status of a run stopped by a signal after writing its checkpoint: run the same command
# again (with --resume) to continue. scripts/slurm/*.sbatch turn it into `scontrol requeue`.
# 75 is EX_TEMPFAIL of sysexits.h ("try again later").
REQUEUE_EXIT = 75
# The rendezvous port under SLURM without MASTER_PORT: PORT_BASE + job id % PORT_SPAN, below
# Linux's ephemeral range (32768-60999), so that two jobs sharing a node rarely collide.
PORT_BASE, PORT_SPAN = 20000, 10000


class LaunchError(ConfigError):
    """The launcher's environment (torchrun's or SLURM's variables) cannot start the run."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_index: int = 0  # this process's CUDA device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Launch:
    """Where this process sits among the run's processes, and how they meet.

    ``source`` is ``torchrun`` (its variables, read by torch's ``env://``), ``slurm`` (an
    ``srun`` task: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``) or ``single``.
    ``init_method`` is the rendezvous URL for ``slurm`` (None otherwise).
    """

    source: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    init_method: Optional[str] = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[01-04,07],gpu3`` -> ``node01``.

    Handles several bracket groups in one name (``rack[1-2]-n[08-09]`` -> ``rack1-n08``) and
    keeps zero padding, as ``scontrol show hostnames`` does.

    Raises:
        LaunchError: an empty or malformed list.
    """
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the first name: up to the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            break
        if ch == "," and depth == 0:
            end = i
            break
    name = text[:end]
    host = re.sub(r"\[([^\[\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], name)
    if depth < 0 or not host or re.search(r"[\[\],\s]", host) or not re.fullmatch(
            r"(?:[^\[\]]|\[\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*\])+", name):
        raise LaunchError(f"cannot read the first host of SLURM's node list {nodelist!r}; set "
                          "MASTER_ADDR to the host of task 0")
    return host


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def launch_from_env(env: Mapping[str, str] = os.environ) -> Launch:
    """Rank, world size and local rank from torchrun's variables (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``) or, without them, from those of an ``srun`` task.

    Under SLURM the rendezvous is ``tcp://MASTER_ADDR:MASTER_PORT``: ``MASTER_ADDR`` defaults
    to the first host of ``SLURM_STEP_NODELIST`` (``SLURM_JOB_NODELIST`` outside a step), where
    task 0 runs, and ``MASTER_PORT`` to ``PORT_BASE + SLURM_JOB_ID % PORT_SPAN``. A batch script
    itself (no ``SLURM_STEP_ID``, ``SLURM_PROCID`` 0) is one process unless it asked for
    several tasks.

    Raises:
        LaunchError: an inconsistent environment (``SLURM_PROCID`` without ``SLURM_NTASKS``,
            a rank outside the world, several tasks but no ``srun``), in one line.
    """
    if "WORLD_SIZE" in env:
        world = _int_var(env, "WORLD_SIZE")
        if world <= 1:
            return Launch("single")
        return Launch("torchrun", _int_var(env, "RANK") if "RANK" in env else 0, world,
                      _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0)
    if "SLURM_PROCID" not in env:
        return Launch("single")
    rank = _int_var(env, "SLURM_PROCID")
    in_step = "SLURM_STEP_ID" in env
    if "SLURM_NTASKS" not in env:
        if in_step or rank != 0:
            raise LaunchError(f"SLURM_PROCID={rank} is set but SLURM_NTASKS is not: start one "
                              "task per GPU with `srun --ntasks=N`, or unset SLURM_PROCID")
        return Launch("single")  # `sbatch --wrap` of one process
    world = _int_var(env, "SLURM_NTASKS")
    if not in_step:
        if world > 1:
            raise LaunchError(f"SLURM_NTASKS={world} but this process is the batch script, not "
                              "an srun task: start it with `srun` (scripts/slurm/pretrain.sbatch "
                              "does), or ask for --ntasks=1")
        return Launch("single")
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={world}")
    if world == 1:
        return Launch("single")
    if "SLURM_LOCALID" not in env:
        raise LaunchError("SLURM_LOCALID is not set in this srun task; start the run with srun")
    addr = env.get("MASTER_ADDR") or first_host(
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "")
    if "MASTER_PORT" in env:
        port = _int_var(env, "MASTER_PORT")
    elif "SLURM_JOB_ID" in env:
        port = PORT_BASE + _int_var(env, "SLURM_JOB_ID") % PORT_SPAN
    else:
        raise LaunchError("neither MASTER_PORT nor SLURM_JOB_ID is set: set MASTER_PORT")
    return Launch("slurm", rank, world, _int_var(env, "SLURM_LOCALID"),
                  f"tcp://{addr}:{port}")


def check_world(cfg: Config, world_size: int, cuda: bool) -> None:
    """Config values that ``world_size`` processes cannot run, checked before the rendezvous.

    Raises:
        ConfigError: naming the key, in one line.
    """
    if world_size <= 1:
        return
    check_sync_norms(cfg, True, cuda)
    t = cfg.train
    keys = t.batch_size * world_size
    if cfg.model.method == "mocov2" and cfg.model.moco.queue < keys:
        raise ConfigError(f"config key 'model.moco.queue' ({cfg.model.moco.queue}) is smaller than "
                          f"the keys one step enqueues (train.batch_size {t.batch_size} x "
                          f"{world_size} processes = {keys}); raise it or use fewer processes")
    if cfg.data.dataset == "embedded" and cfg.data.num_images < keys:
        raise ConfigError(f"config key 'data.num_images' ({cfg.data.num_images}) is smaller than "
                          f"one step's batch (train.batch_size {t.batch_size} x {world_size} "
                          "processes); raise it or use fewer processes")


def init_distributed(device_kind: str, cfg: Optional[Config] = None) -> DistInfo:
    """Initialise torch.distributed from torchrun's or SLURM's environment (see
    :func:`launch_from_env`; no-op for one process). On CUDA, process ``local_rank`` takes
    GPU ``local_rank`` of its node, or the one GPU it sees when the launcher binds one per task.

    Raises:
        LaunchError: before any rendezvous, for an environment that cannot start the run or a
            local rank without its GPU.
        ConfigError: before any rendezvous, for a ``cfg`` this many processes cannot run
            (:func:`check_world`).
    """
    launch = launch_from_env()
    if launch.world_size <= 1:
        return DistInfo()
    if cfg is not None:
        check_world(cfg, launch.world_size, device_kind == "cuda")
    index = launch.local_rank
    if device_kind == "cuda":
        count = torch.cuda.device_count()
        if index >= count:
            if count != 1:
                raise LaunchError(f"process {launch.rank} has local rank {index} but sees {count} "
                                  "CUDA device(s): start one task per GPU (SLURM: "
                                  "--ntasks-per-node equal to --gpus-per-node)")
            index = 0  # one GPU bound to this task (e.g. srun --gpus-per-task=1)
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if launch.source == "slurm":
            logger.info("SLURM task %d of %d (local %d), rendezvous %s", launch.rank,
                        launch.world_size, launch.local_rank, launch.init_method)
            dist.init_process_group(backend, init_method=launch.init_method, rank=launch.rank,
                                    world_size=launch.world_size)
        else:
            dist.init_process_group(backend=backend)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), launch.local_rank, index)
    if device_kind == "cuda":
        torch.cuda.set_device(index)
    return info


class StopAgreement:
    """The stop decision of all processes after a step: stop when any of them asks to.

    One all-reduce (MAX) of a one-element CPU tensor per call, over a gloo group (the default
    group when it is gloo; its own group under NCCL), so that it never waits for the GPU. Every
    process must call :meth:`agree` once after each step; they then stop after the same step.
    One process needs no collective.
    """

    def __init__(self, info: DistInfo) -> None:
        self.group = None
        self.world_size = info.world_size
        if info.world_size > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")
        self._flag = torch.zeros(1, dtype=torch.int32)

    def agree(self, stop_here: bool) -> bool:
        """True on every process when ``stop_here`` is True on any."""
        if self.world_size <= 1:
            return stop_here
        self._flag.fill_(int(stop_here))
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(self._flag.item())


def resolve_device(kind: str) -> torch.device:
    """``train.device`` (auto | cpu | cuda) -> the device; ``ConfigError`` for cuda without one."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' is cuda but no CUDA device is available "
                          "(use train.device=cpu or auto)")
    return torch.device(kind)


def check_sync_norms(cfg: Config, distributed: bool, cuda: bool) -> None:
    """``sync`` norms across processes need CUDA (torch's SyncBatchNorm); ``ConfigError``."""
    if distributed and not cuda and "sync" in (cfg.model.student_norm, cfg.model.teacher_norm):
        raise ConfigError("config key 'model.student_norm'/'model.teacher_norm' is sync, which "
                          "across processes needs CUDA (torch's SyncBatchNorm); on CPU use one "
                          "process with train.bn_group_size")


def wrap_ddp(model: nn.Module, info: DistInfo,
             cuda: bool) -> Optional[nn.parallel.DistributedDataParallel]:
    """``model`` under DDP for more than one process (None for one). Per-device BN statistics
    (no buffer broadcast), as in the paper; ``sync`` norms are SyncBatchNorm layers already."""
    if info.world_size <= 1:
        return None
    with warnings.catch_warnings():  # torch >= 2.14 names a successor that is not there yet
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated")
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device_index] if cuda else None, broadcast_buffers=False)

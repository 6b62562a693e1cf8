"""The training device and torch.distributed set-up from torchrun's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config, ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device_kind == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def resolve_device(kind: str) -> torch.device:
    """``train.device`` (auto | cpu | cuda) -> the device; ``ConfigError`` for cuda without one."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' is cuda but no CUDA device is available "
                          "(use train.device=cpu or auto)")
    return torch.device(kind)


def check_sync_norms(cfg: Config, distributed: bool, cuda: bool) -> None:
    """``sync`` norms across processes need CUDA (torch's SyncBatchNorm)."""
    if distributed and not cuda and "sync" in (cfg.model.student_norm, cfg.model.teacher_norm):
        raise RuntimeError("model.student_norm/teacher_norm=sync across processes needs CUDA "
                           "(torch's SyncBatchNorm); on CPU use one process with "
                           "train.bn_group_size")


def wrap_ddp(model: nn.Module, info: DistInfo,
             cuda: bool) -> Optional[nn.parallel.DistributedDataParallel]:
    """``model`` under DDP for more than one process (None for one). Per-device BN statistics
    (no buffer broadcast), as in the paper; ``sync`` norms are SyncBatchNorm layers already."""
    if info.world_size <= 1:
        return None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[info.local_rank] if cuda else None, broadcast_buffers=False)

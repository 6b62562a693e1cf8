"""Pretraining samples and batches: per-sample seeded augmentation and resumable, rank- and
virtual-device-sharded batch sampling."""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from ..config import ConfigError


class SeededSample(Dataset):
    """Wraps a dataset so that sample ``(index, epoch)`` is augmented with an RNG seeded from
    ``(seed, epoch, index)``: augmentations do not depend on worker assignment, so a resumed
    run sees exactly the views the uninterrupted run would have seen."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        h = hashlib.blake2b(f"{self.seed}/{epoch}/{index}".encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue seeds for every
            # accelerator backend, formatting a stack trace each time (~0.4 ms per sample)
            torch.default_generator.manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
            return self.dataset[index]


class EpochBatchSampler(Sampler):
    """Shuffled, rank-sharded batches of ``(index, epoch)`` keys, startable mid-epoch.

    With ``groups > 1`` (virtual devices) the process holds devices ``rank * groups + k``,
    ``k < groups``, of ``world * groups``, and its batch is their batches one after the other;
    device ``d`` always draws ``perm[d :: world * groups]``. So one process with a batch of
    ``groups * b`` sees, group by group, what ``groups`` processes with a batch of ``b`` see.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 groups: int = 1) -> None:
        if batch_size % groups != 0:
            raise ValueError(f"batch size {batch_size} is not divisible into {groups} groups")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.groups = groups
        self.batches_per_epoch = n // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"config key 'train.batch_size' ({batch_size} per process x {world} processes) "
                f"is larger than the dataset ({n} images); lower it")
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.batches_per_epoch * self.batch_size * self.world]
        g, devices = self.groups, self.world * self.groups
        per = self.batch_size // g
        mine = [perm[self.rank * g + k :: devices].tolist() for k in range(g)]
        for b in range(self.start, self.batches_per_epoch):
            yield [(i, self.epoch) for dev in mine for i in dev[b * per : (b + 1) * per]]


def collate_pairs(batch):
    v1 = torch.stack([b[0][0] for b in batch])
    v2 = torch.stack([b[0][1] for b in batch])
    return v1, v2

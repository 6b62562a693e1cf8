"""The pretraining data feed: loader micro-batches of two views, augmented and normalised on
the training device."""

from __future__ import annotations

import logging
import signal
import time
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from ..config import Config, bn_groups
from .augment import Normalizer, TwoViewTransform
from .batch_augment import BatchTwoViewAugment, GeometricTwoView, batch_generator
from .datasets import build_dataset
from .sampling import EpochBatchSampler, SeededSample, collate_pairs

logger = logging.getLogger(__name__)


def ignore_time_limit_signal(worker_id: int) -> None:  # noqa: ARG001
    """Loader workers ignore SIGUSR1, SLURM's warning before the time limit, which reaches
    every process of a job: the training process alone acts on it. (SIGTERM stays as it is:
    the loader ends its workers with it.)"""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def resolve_augment_device(kind: str, device: torch.device) -> str:
    """``data.augment_device`` -> ``"cpu"`` (per-image pipeline in the loader workers) or
    ``"device"`` (batched on the training device, which is the CPU itself for
    ``train.device=cpu``: how the tests run it)."""
    if kind == "auto":
        return "device" if device.type == "cuda" else "cpu"
    if kind == "cuda" and device.type != "cuda":
        logger.info("data.augment_device=cuda on a %s run: the batched augmentation runs on the "
                    "%s", device.type, device.type)
    return "device" if kind == "cuda" else "cpu"


class TwoViewFeed:
    """Micro-batches of the pretraining split, resumable at any micro-batch.

    The whole two-view pipeline runs in the loader workers, or only decode + crop + flip runs
    there and the colour part is batched on the device (``batch_aug``, with parameters drawn
    from a generator keyed by ``(seed, rank, micro-batch)``).

    Args:
        cfg: resolved configuration (``data``, ``train.seed``, ``train.batch_size``).
        aug: the method's two-view transform.
        device: the training device.
        rank, world: this process and the number of processes.
        memory_format: of the views handed to the model.
    """

    def __init__(self, cfg: Config, aug: TwoViewTransform, device: torch.device, rank: int,
                 world: int, memory_format: torch.memory_format) -> None:
        d = cfg.data
        self.data_cfg, self.seed, self.rank = d, cfg.train.seed, rank
        self.device, self.memory_format = device, memory_format
        self.augment_mode = resolve_augment_device(d.augment_device, device)
        self.batch_aug = None
        if self.augment_mode == "device":
            base = build_dataset(d, d.split, GeometricTwoView(d.res, d.crop_scale_min,
                                                              aug.student_cfg.flip_p))
            self.batch_aug = BatchTwoViewAugment(aug.student_cfg, aug.teacher_cfg, d.mean,
                                                 d.std).to(device)
            if cfg.train.compile:  # the colour part as one graph, reused for every draw
                self.batch_aug.compile_colour()
        else:
            base = build_dataset(d, d.split, aug)
        self.normalizer = Normalizer(d.mean, d.std).to(device)
        self.dataset = SeededSample(base, cfg.train.seed)
        self.sampler = EpochBatchSampler(len(base), cfg.train.batch_size, cfg.train.seed, rank,
                                         world, bn_groups(cfg))
        self.batches_per_epoch = self.sampler.batches_per_epoch

    def loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.sampler.set_position(epoch, start_batch)
        d = self.data_cfg
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=d.workers,
                          pin_memory=d.pin_memory and self.device.type == "cuda",
                          collate_fn=collate_pairs, persistent_workers=False,
                          worker_init_fn=ignore_time_limit_signal if d.workers > 0 else None)

    def micro_batches(self, start: int, on_wait: Callable[[float], None]) -> Iterator:
        """Loader micro-batches from micro-batch ``start`` on, across epochs; the seconds spent
        waiting for each go to ``on_wait``."""
        micro = start
        while True:
            epoch, first = divmod(micro, self.batches_per_epoch)
            t = time.perf_counter()
            for batch in self.loader(epoch, first):
                on_wait(time.perf_counter() - t)
                micro += 1
                yield batch
                t = time.perf_counter()

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalizer(x.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=self.memory_format)

    def augment(self, batch, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of micro-batch ``micro`` on the device, augmented and normalised."""
        v1, v2 = batch
        if self.batch_aug is None:
            return self._to_device(v1), self._to_device(v2)
        # the loader yields (B, H, W, 3) uint8; as NCHW this is channels_last already
        v1 = v1.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        v2 = v2.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        g = batch_generator(self.seed, self.rank, micro)
        return self.batch_aug(v1, v2, g, self.memory_format)

"""The pretraining loop: data, optimiser, schedules, AMP, DDP, checkpoints, logging."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config, ConfigError, check_encoder, config_from_dict, save_config
from ..data.augment import Normalizer, TwoViewTransform
from ..data.batch_augment import BatchTwoViewAugment, GeometricTwoView, batch_generator
from ..data.datasets import build_dataset
from ..eval.knn import knn_eval_encoder
from ..models import M2Teacher
from ..models.mocov2 import MoCoV2
from ..models import schedules as S
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_MARKER,
    capture_rng_state,
    restore_rng_state,
    save_rotating,
)
from .run_dir import (
    ResumeConfigError,
    check_resume_config,
    claim_output_dir,
    find_resume_checkpoint,
)

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the broken state is not saved, and the message names the
    checkpoint to go back to."""


class DivergedStateError(NonFiniteLossError):
    """A weight or BN statistic became NaN/inf or diverged (see :data:`DIVERGENCE_GROWTH`)
    while the (bounded) loss stayed finite; the broken state is not saved."""


# The divergence rule, checked whenever the trainer logs, checkpoints or stops (one fused norm
# and one host sync, nothing per step), and on every checkpoint ``--resume`` considers. The
# state has diverged when
# - a floating-point parameter or buffer holds NaN/inf, or one tensor's L2 norm exceeds
#   DIVERGED_NORM;
# - the L2 norm of all parameters together exceeds DIVERGENCE_GROWTH times its value at
#   initialisation (the freshly built model, also for a resumed run);
# - the L2 norm of all floating-point buffers together (BN running statistics, the MoCo queue)
#   exceeds STATISTICS_GROWTH times its value at initialisation. Running variances are second
#   moments: they grow as the square of the weights before a BN layer, whose scale BN hides
#   from the loss, so their limit is the square of the parameters' one.
# Healthy runs stay far inside. Measured (norm / norm at initialisation): the demo config
# (configs/pretrain/embedded_cpu.yaml) over its first 40 steps, parameters 1.0001 and
# statistics 0.6-0.76; the tests' 6-step ResNet-18 at lr 0.1 per 8 images, parameters 1.01 and
# statistics 11.6 (the stem's running variance follows its growing conv weights). A run whose
# loss sat at its upper bound reached a weight norm of 7.7e10 against a healthy ~30.
DIVERGED_NORM = 1e12
DIVERGENCE_GROWTH = 1e3
STATISTICS_GROWTH = DIVERGENCE_GROWTH**2


# ----------------------------------------------------------------------------- distributed
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


# ----------------------------------------------------------------------------- data
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


# ----------------------------------------------------------------------------- optimiser
def param_groups(modules: list[nn.Module], weight_decay: float, exclude_bias_norm: bool) -> list[dict]:
    """Two groups: weights with weight decay; biases and norm parameters (ndim <= 1) without.

    With LARS, a group whose weight decay is 0 is also excluded from the trust-ratio adaptation
    (timm's ``Lars`` adapts only where weight decay is set, unless ``always_adapt``).
    """
    decay, no_decay = [], []
    for m in modules:
        for _, p in m.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if exclude_bias_norm and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: Config, modules: list[nn.Module], lr: float) -> torch.optim.Optimizer:
    groups = param_groups(modules, cfg.optim.weight_decay, cfg.optim.exclude_bias_norm)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum)
    from timm.optim import Lars

    return Lars(groups, lr=lr, momentum=cfg.optim.momentum)


# ----------------------------------------------------------------------------- trainer
def resolve_device(kind: str) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' is cuda but no CUDA device is available "
                          "(use train.device=cpu or auto)")
    return torch.device(kind)


def bn_groups(cfg: Config) -> int:
    """Virtual devices per view batch (``train.batch_size / train.bn_group_size``, or 1)."""
    g = cfg.train.bn_group_size
    return cfg.train.batch_size // g if g > 0 else 1


def build_model(cfg: Config, distributed: bool = False) -> nn.Module:
    """The model named by ``cfg.model``; ``distributed`` turns ``sync`` norms into SyncBatchNorm."""
    m = cfg.model
    kwargs = encoder_kwargs(cfg)
    if m.method == "mocov2":
        return MoCoV2(m.arch, m.moco_dim, m.moco_hidden, m.moco_queue, m.moco_temperature,
                      m.key_norm, m.key_alpha, m.shuffle_splits, encoder_kwargs=kwargs)
    return M2Teacher(m.arch, m.proj_hidden, m.proj_out, m.pred_hidden, m.teacher_norm, m.alpha_base,
                     student_norm=m.student_norm, bn_groups=bn_groups(cfg),
                     distributed=distributed, encoder_kwargs=kwargs)


def encoder_kwargs(cfg: Config) -> dict:
    """``timm.create_model`` arguments from ``cfg.model`` (``zero_init_last`` when set)."""
    z = cfg.model.zero_init_last
    return {} if z is None else {"zero_init_last": z}


def build_augmentation(cfg: Config) -> TwoViewTransform:
    """The authors' two-view pipeline for M2; MoCo v2's symmetric one for ``mocov2``."""
    d = cfg.data
    if cfg.model.method == "mocov2":
        return TwoViewTransform(d.res, d.crop_scale_min, jitter=(0.4, 0.4, 0.4, 0.1),
                                blur_sigma=tuple(d.blur_sigma), student_blur_p=0.5,
                                teacher_blur_p=0.5, teacher_solarize_p=0.0)
    return TwoViewTransform(d.res, d.crop_scale_min, blur_sigma=tuple(d.blur_sigma),
                            teacher_solarize_p=d.solarize_p)


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


@dataclass
class _LogWindow:
    """What is accumulated between two log rows (device tensors stay on the device)."""

    loss_sum: torch.Tensor
    count: int = 0
    images: int = 0
    wait_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


class Trainer:
    """Momentum² Teacher pretraining.

    Args:
        cfg: resolved configuration.
        output_dir: where checkpoints, the resolved config and TensorBoard logs go.
        resume: continue from the newest loadable checkpoint in ``output_dir``.
        progress: show a tqdm progress bar (main process only).
        allow_config_changes: on resume, accept config changes outside
            ``run_dir.RESUME_CHANGEABLE_KEYS`` (``--resume-allow-changes``); they are logged.

    Raises:
        RunDirError: ``output_dir`` is a file, is used by another process, or holds another
            run (without ``resume``); with ``resume``, all its checkpoints are unreadable or
            the config changed.
    """

    def __init__(self, cfg: Config, output_dir: str | Path, resume: bool = False,
                 progress: bool = True, allow_config_changes: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(output_dir)
        self.allow_config_changes = allow_config_changes
        self.device = resolve_device(cfg.train.device)
        check_encoder(cfg)  # before anything is written
        self.dist = init_distributed(self.device.type)
        self._run_lock = claim_output_dir(self.out, resume, self.dist.is_main)
        self._resumed_from: Optional[tuple[Path, int]] = None
        self._last_saved: Optional[tuple[Path, int]] = None
        self.progress = progress and self.dist.is_main
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if cfg.train.amp and (self.cuda or cfg.train.amp_cpu)
                          else None)

        # data: the whole two-view pipeline in the loader workers, or only decode + crop + flip
        # there and the rest batched on the device (``self.batch_aug``)
        d = cfg.data
        aug = build_augmentation(cfg)
        self.augment_mode = resolve_augment_device(d.augment_device, self.device)
        self.batch_aug: Optional[BatchTwoViewAugment] = None
        if self.augment_mode == "device":
            base = build_dataset(d, d.split, GeometricTwoView(d.res, d.crop_scale_min,
                                                              aug.student_cfg.flip_p))
            self.batch_aug = BatchTwoViewAugment(aug.student_cfg, aug.teacher_cfg, d.mean,
                                                 d.std).to(self.device)
        else:
            base = build_dataset(d, d.split, aug)
        self.dataset = SeededSample(base, cfg.train.seed)
        self.sampler = EpochBatchSampler(len(base), cfg.train.batch_size, cfg.train.seed,
                                         self.dist.rank, self.dist.world_size, bn_groups(cfg))
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.steps_per_epoch = max(self.batches_per_epoch // cfg.train.accum_steps, 1)
        if cfg.train.max_steps > 0:
            self.total_steps = cfg.train.max_steps
        else:
            self.total_steps = max(int(round(cfg.train.epochs * self.steps_per_epoch)), 1)
        self.warmup_steps = min(int(round(cfg.optim.warmup_epochs * self.steps_per_epoch)),
                                self.total_steps)
        self.global_batch = cfg.train.batch_size * self.dist.world_size * cfg.train.accum_steps
        self.base_lr = S.scale_lr(cfg.optim.base_lr, self.global_batch, cfg.optim.lr_reference_batch)
        self.m_base = cfg.train.m_base
        if cfg.train.m_base_reference_batch > 0:
            self.m_base = S.scale_m_base(cfg.train.m_base, self.global_batch,
                                         cfg.train.m_base_reference_batch)

        # model
        distributed = self.dist.world_size > 1
        if distributed and not self.cuda and "sync" in (cfg.model.student_norm, cfg.model.teacher_norm):
            raise RuntimeError("model.student_norm/teacher_norm=sync across processes needs CUDA "
                               "(torch's SyncBatchNorm); on CPU use one process with "
                               "train.bn_group_size")
        self.model = build_model(cfg, distributed).to(self.device)
        self.normalizer = Normalizer(d.mean, d.std).to(self.device)
        if self.cuda and cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # every trainable parameter: student (+ predictor for M2); teachers have requires_grad off
        self.optimizer = build_optimizer(cfg, [self.model], self.base_lr)
        self.step_module: nn.Module = self.model
        self.ddp: Optional[nn.parallel.DistributedDataParallel] = None
        if self.dist.world_size > 1:
            # Per-device BN statistics (no buffer broadcast), as in the paper; "sync" norms
            # are SyncBatchNorm layers already.
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.cuda else None,
                broadcast_buffers=False,
            )
            self.step_module = self.ddp
        if cfg.train.compile:
            self.step_module = torch.compile(self.step_module)
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (continuous across epochs)
        self._stop_signal: Optional[int] = None
        self.history: list[dict] = []
        # parameter and buffer norms at initialisation: the divergence rule's reference
        self._norm_reference = self._group_norms_at_init()

        if resume:
            self._resume()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            CHECKPOINT_MARKER: CHECKPOINT_FORMAT,  # what --resume recognises, whatever the name
            "student": self.model.student.state_dict(),
            "teacher": self.model.teacher.state_dict(),
            "predictor": self.model.predictor.state_dict() if hasattr(self.model, "predictor") else {},
            # the model's own buffers (MoCo's queue and pointer)
            "extra": {k: v for k, v in self.model.named_buffers(recurse=False)},
            "optimizer": self.optimizer.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaler
            "step": self.step,
            "total_steps": self.total_steps,
            "rng": capture_rng_state(),
            "config": self.cfg.to_dict(),
            "meta": {"arch": self.cfg.model.arch, "mean": list(self.cfg.data.mean),
                     "std": list(self.cfg.data.std), "method": self.cfg.model.method,
                     "teacher_norm": self.cfg.model.teacher_norm,
                     "student_norm": self.cfg.model.student_norm,
                     "bn_group_size": self.cfg.train.bn_group_size,
                     "bn_groups": bn_groups(self.cfg)},
        }

    def _resume(self) -> None:
        found = find_resume_checkpoint(self.out, self._diverged_checkpoint)
        if found is None:
            logger.info("--resume: no checkpoint in %s, starting from scratch", self.out)
            return
        path, ckpt = found
        check_resume_config(ckpt["config"], self.cfg, path, self.allow_config_changes)
        saved = config_from_dict(ckpt["config"])
        if bn_groups(saved) != bn_groups(self.cfg):
            raise ResumeConfigError(f"{path} was trained with {bn_groups(saved)} BN groups per batch, the "
                               f"current config has {bn_groups(self.cfg)}; resume with the same "
                               "train.batch_size / train.bn_group_size or a new --output-dir")
        self.model.student.load_state_dict(ckpt["student"])
        self.model.teacher.load_state_dict(ckpt["teacher"])
        if hasattr(self.model, "predictor"):
            self.model.predictor.load_state_dict(ckpt["predictor"])
        with torch.no_grad():
            for k, v in ckpt.get("extra", {}).items():
                getattr(self.model, k).copy_(v)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        restore_rng_state(ckpt["rng"])
        self._resumed_from = (path, self.step)
        logger.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Optional[Path]:
        if not self.dist.is_main:
            return None
        path = save_rotating(self.state_dict(), self.out, self.step,
                             self.cfg.checkpoint.keep_last)
        self._last_saved = (path, self.step)
        return path

    # ------------------------------------------------------------------ signals
    def _handle_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    # ------------------------------------------------------------------ loop
    def _set_schedules(self, k: int) -> tuple[float, float, float]:
        lr = S.learning_rate(k, self.total_steps, self.base_lr, self.warmup_steps,
                             self.cfg.optim.warmup_factor)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.cfg.train.m_schedule == "constant":
            one_minus_m = self.m_base
        else:
            one_minus_m = S.ema_one_minus_m(k, self.total_steps, self.m_base)
        alpha = S.momentum_bn_alpha(k, self.total_steps, self.cfg.model.alpha_base)
        self.model.set_alpha(alpha)
        return lr, one_minus_m, alpha

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.sampler.set_position(epoch, start_batch)
        d = self.cfg.data
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=d.workers,
                          pin_memory=d.pin_memory and self.cuda, collate_fn=collate_pairs,
                          persistent_workers=False)

    # ------------------------------------------------------------------ loop steps
    # fit() = while not done: run_step() (next batch -> augment -> forward/backward, accum
    # times; then the optimizer and EMA step) and after_step() (the host sync, log,
    # checkpoint). Only after_step() reads device values on the host, and only when it logs,
    # checkpoints or stops.
    def _micro_batches(self) -> Iterator:
        """Micro-batches from ``self.micro`` on, across epochs; waiting time goes to the log
        window."""
        while True:
            epoch, start = divmod(self.micro, self.batches_per_epoch)
            t = time.perf_counter()
            for batch in self._loader(epoch, start):
                self._window.wait_s += time.perf_counter() - t
                yield batch
                t = time.perf_counter()

    def next_batch(self):
        """The next micro-batch of uint8 view pairs from the loader."""
        return next(self._batches)

    def _memory_format(self) -> torch.memory_format:
        if self.cuda and self.cfg.train.channels_last:
            return torch.channels_last
        return torch.contiguous_format

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalizer(x.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=self._memory_format())

    def augment(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Views on the device, normalised; with the device pipeline, also colour-augmented with
        parameters drawn from a generator keyed by ``(seed, rank, micro-batch)``."""
        v1, v2 = batch
        if self.batch_aug is None:
            return self._to_device(v1), self._to_device(v2)
        # the loader yields (B, H, W, 3) uint8; as NCHW this is channels_last already
        v1 = v1.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        v2 = v2.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        g = batch_generator(self.cfg.train.seed, self.dist.rank, self.micro)
        return self.batch_aug(v1, v2, g, self._memory_format())

    def forward_backward(self, v1: torch.Tensor, v2: torch.Tensor, sync: bool) -> torch.Tensor:
        """Loss of one micro-batch and its backward (scaled by 1/accum). Under DDP, ``sync``
        False skips the gradient all-reduce (micro-batches before the last of a step)."""
        skip_reduce = self.ddp is not None and not sync
        with self.ddp.no_sync() if skip_reduce else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss = self.step_module(v1, v2)["loss"]
            (loss / self.cfg.train.accum_steps).backward()
        return loss.detach()

    def optimizer_step(self, one_minus_m: float) -> None:
        """Gradient clipping, optimizer step, zeroing, then the teacher's EMA step."""
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_teacher(one_minus_m)

    def run_step(self) -> None:
        """One optimizer step: ``accum_steps`` micro-batches, then the optimizer and EMA."""
        k = self.step
        accum = self.cfg.train.accum_steps
        self._schedule = self._set_schedules(k)
        for i in range(accum):
            v1, v2 = self.augment(self.next_batch())
            loss = self.forward_backward(v1, v2, sync=i == accum - 1)
            self.micro += 1
            bad = ~torch.isfinite(loss)
            self._first_bad = torch.where(bad & (self._first_bad < 0),
                                          torch.full_like(self._first_bad, k), self._first_bad)
            self._window.loss_sum += loss
            self._window.count += 1
            self._window.images += 2 * v1.shape[0] * self.dist.world_size
        self.optimizer_step(self._schedule[1])
        self.step += 1

    def _host_sync_checks(self) -> None:
        """Checks that read device values; run only when logging, checkpointing or stopping."""
        fb = int(self._first_bad)
        if fb >= 0:
            raise NonFiniteLossError(
                f"loss became non-finite at step {fb}; stopping without saving that state. "
                f"{self._where_to_go_back()} Likely causes: a learning rate too high for the "
                "batch (optim.base_lr, optim.warmup_epochs), corrupt input data, or weights "
                "that diverged earlier")
        self._check_finite_state()

    def _where_to_go_back(self) -> str:
        """Which checkpoint holds the last state that passed the checks (for stop messages)."""
        if self._last_saved is not None:
            path, step = self._last_saved
            return (f"The newest checkpoint, {path} (step {step}), passed these checks when "
                    "this run saved it.")
        if self._resumed_from is not None:
            path, step = self._resumed_from
            return (f"No checkpoint holds the broken state: this run resumed from {path} (step "
                    f"{step}), whose state passed the checks, and wrote none since.")
        return "No checkpoint was written."

    def log(self) -> None:
        """One history row (mean loss over the window, images/s, data-wait share)."""
        w, now = self._window, time.perf_counter()
        lr, one_minus_m, alpha = self._schedule
        mean_loss = (w.loss_sum / max(w.count, 1)).item()
        row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": mean_loss,
               "lr": lr, "m": 1 - one_minus_m, "alpha": alpha,
               "img_per_s": w.images / max(now - w.t0, 1e-9),
               "data_wait": w.wait_s / max(now - w.t0, 1e-9)}
        self.history.append(row)
        if self._writer is not None:
            for key in ("loss", "lr", "m", "alpha", "img_per_s", "data_wait"):
                self._writer.add_scalar(f"train/{key}", row[key], self.step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}",
                                  m=f"{1 - one_minus_m:.4f}", alpha=f"{alpha:.3f}",
                                  ips=f"{row['img_per_s']:.0f}",
                                  wait=f"{100 * row['data_wait']:.0f}%")
        self._window = _LogWindow(torch.zeros((), device=self.device))

    def after_step(self) -> None:
        """Host sync and checks, log row, progress, kNN monitor, checkpoint, as due."""
        done = self.step >= self.total_steps
        log_now = self.step % self.cfg.train.log_every == 0 or done
        ckpt_now = self.step % self.cfg.checkpoint.every_steps == 0 or done
        stop_now = self._stop_signal is not None
        if log_now or ckpt_now or stop_now:
            self._host_sync_checks()
        if log_now:
            self.log()
        if self._bar is not None:
            self._bar.update(1)
        if self._knn_due():
            self._knn_monitor(self._writer)
        if ckpt_now or stop_now:
            self.save_checkpoint()

    @contextlib.contextmanager
    def _fit_session(self):
        """Signal handlers, TensorBoard writer, progress bar and the data iterator for fit()."""
        old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old_handlers[sig] = signal.signal(sig, self._handle_signal)
            except ValueError:  # not in the main thread
                pass
        self._writer = self._bar = None
        if self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tb"))
            except ImportError:
                logger.warning("tensorboard not installed: no TensorBoard scalars")
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain",
                             dynamic_ncols=True)
        self.micro = self.step * self.cfg.train.accum_steps
        self._first_bad = torch.tensor(-1, device=self.device)
        self._window = _LogWindow(torch.zeros((), device=self.device))
        self._batches = self._micro_batches()
        try:
            yield
        finally:
            self._batches.close()  # shuts the loader's workers down
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if self._bar is not None:
                self._bar.close()
            if self._writer is not None:
                self._writer.close()

    def fit(self) -> dict:
        """Train until ``total_steps`` (or a SIGTERM/SIGINT, after a checkpoint).

        Returns:
            ``{"status", "step", "total_steps", "history"}``.

        A fresh run that fails before its first checkpoint removes its ``config.yaml``, so the
        corrected command can use the same ``--output-dir`` without ``--resume``.

        Raises:
            NonFiniteLossError: when the loss becomes NaN/inf (no checkpoint is written after it).
        """
        status = "completed"
        try:
            with self._fit_session():
                self.model.train()
                while self.step < self.total_steps and self._stop_signal is None:
                    self.run_step()
                    self.after_step()
                if self._stop_signal is not None:
                    status = f"interrupted by signal {self._stop_signal}"
                    logger.warning("%s: checkpoint saved at step %d in %s", status, self.step,
                                   self.out)
        except BaseException:
            self._forget_unsaved_fresh_run()
            raise
        return {"status": status, "step": self.step, "total_steps": self.total_steps,
                "history": self.history}

    def _forget_unsaved_fresh_run(self) -> None:
        """Remove ``config.yaml`` of a fresh run that failed before writing any checkpoint:
        nothing resumable exists, and the file would block the corrected command."""
        cfg_file = self.out / "config.yaml"
        if (self.dist.is_main and self._resumed_from is None and self._last_saved is None
                and cfg_file.is_file()):
            cfg_file.unlink()
            logger.info("removed %s: the run failed before its first checkpoint", cfg_file)

    def _named_state(self) -> tuple[list[str], list[torch.Tensor], list[str], list[torch.Tensor]]:
        """Names and tensors of the parameters, then of the floating-point buffers."""
        p = list(self.model.named_parameters())
        b = [(n, t) for n, t in self.model.named_buffers() if t.is_floating_point()]
        return [n for n, _ in p], [t for _, t in p], [n for n, _ in b], [t for _, t in b]

    @staticmethod
    def _norms(params: list[torch.Tensor], buffers: list[torch.Tensor]):
        """Per-tensor L2 norms (parameters, then buffers) and the L2 norms of all parameters
        and of all buffers together, on the tensors' device (no host sync)."""
        device = (params + buffers)[0].device if params + buffers else torch.device("cpu")
        parts = []
        for group in (params, buffers):
            norms = [n.float() for n in torch._foreach_norm(group)] if group else []
            parts.append(torch.stack(norms) if norms else torch.zeros(0, device=device))
        return torch.cat(parts), parts[0].square().sum().sqrt(), parts[1].square().sum().sqrt()

    @torch.no_grad()
    def _group_norms_at_init(self) -> tuple[float, float]:
        _, params, _, buffers = self._named_state()
        _, p, b = self._norms(params, buffers)
        return float(p), float(b)

    def _divergence(self, names, norms, params, buffers) -> Optional[str]:
        """What breaks the divergence rule (see :data:`DIVERGENCE_GROWTH`), or None."""
        ok = torch.isfinite(norms) & (norms <= DIVERGED_NORM)
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0])
            return (f"{names[i]} diverged (norm {float(norms[i]):.3g}; {int((~ok).sum())} "
                    "tensors NaN/inf or above 1e12)")
        for what, value, ref, limit in self._growth_limits(params, buffers):
            if ref > 0 and float(value) > limit * ref:
                return (f"the {what} norm diverged: {float(value):.3g}, {float(value) / ref:.3g} "
                        f"times its {ref:.3g} at initialisation (limit {limit:g} times)")
        return None

    def _growth_limits(self, params, buffers):
        """(what, norm now, norm at initialisation, growth limit) of the divergence rule."""
        return (("parameter", params, self._norm_reference[0], DIVERGENCE_GROWTH),
                ("buffer (BN statistics)", buffers, self._norm_reference[1], STATISTICS_GROWTH))

    @torch.no_grad()
    def _check_finite_state(self) -> None:
        """Stop when a weight or statistic diverged: the loss is bounded (normalised L2), so it
        can stay finite while weights reach 1e30 and BN running variances overflow.

        Applies the divergence rule (see :data:`DIVERGENCE_GROWTH` and
        :data:`STATISTICS_GROWTH`) to every floating-point
        parameter and buffer of the model (student, teacher, predictor, Momentum BN
        statistics, MoCo queue) with one fused norm and one host sync.

        Raises:
            DivergedStateError: naming the tensor or norm, and the checkpoint to go back to.
        """
        p_names, params, b_names, bufs = self._named_state()
        norms, params, buffers = self._norms(params, bufs)
        names = p_names + b_names
        ok = (torch.isfinite(norms) & (norms <= DIVERGED_NORM)).all()
        for _, value, ref, limit in self._growth_limits(params, buffers):
            if ref > 0:
                ok = ok & (value <= limit * ref)
        if bool(ok):  # the one host sync
            return
        what = self._divergence(names, norms, params, buffers)
        raise DivergedStateError(
            f"by step {self.step}, {what}; stopping without saving that state. "
            f"{self._where_to_go_back()} Lower optim.base_lr or lengthen optim.warmup_epochs")

    def _diverged_checkpoint(self, ckpt: dict) -> Optional[str]:
        """Why ``--resume`` must not continue from ``ckpt`` under the divergence rule, or None."""
        tensors = {f"{part}.{k}": v for part in ("student", "teacher", "predictor")
                   for k, v in (ckpt.get(part) or {}).items()}
        tensors.update(ckpt.get("extra") or {})
        p_names, _, b_names, _ = self._named_state()
        p_names = [n for n in p_names if n in tensors]
        b_names = [n for n in b_names if n in tensors]
        norms, params, buffers = self._norms([tensors[n].float() for n in p_names],
                                             [tensors[n].float() for n in b_names])
        return self._divergence(p_names + b_names, norms, params, buffers)

    # ------------------------------------------------------------------ kNN monitor
    def _knn_due(self) -> bool:
        c = self.cfg
        if c.knn.every_epochs <= 0 or not c.data.knn_train_split or not self.dist.is_main:
            return False
        every = max(int(round(c.knn.every_epochs * self.steps_per_epoch)), 1)
        return self.step % every == 0 or self.step == self.total_steps

    def knn_eval(self, which: str = "teacher") -> dict[str, float]:
        """kNN top-1/top-5 of the teacher (or student) encoder on the configured splits."""
        enc = getattr(self.model, which).encoder
        return knn_eval_encoder(enc, self.cfg.data, self.cfg.knn, self.device)

    def _knn_monitor(self, writer) -> None:
        res = self.knn_eval()
        logger.info("step %d: kNN top-1 %.2f top-5 %.2f", self.step, res["top1"], res["top5"])
        if self.history:
            self.history[-1]["knn_top1"] = res["top1"]
        if writer is not None:
            writer.add_scalar("knn/top1", res["top1"], self.step)
            writer.add_scalar("knn/top5", res["top5"], self.step)


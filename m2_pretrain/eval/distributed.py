"""Evaluation on one or many processes: where each process runs, its share of a dataset, and the
collectives that turn the shares back into one result.

The three evaluations (``linear``, ``knn``, ``semi``) run data-parallel under ``torchrun`` or
``srun`` (see :func:`m2_pretrain.engine.distributed.launch_from_env`):

- a dataset is sharded by :func:`shard_indices` (image ``i`` goes to process ``i % world``),
  without the repeats a ``DistributedSampler`` pads uneven shards with, so every image is
  evaluated exactly once; counts are summed over the processes (:func:`evaluate_sharded`
  checks the total);
- training samplers are ``DistributedSampler`` s over a global batch that is the same for any
  number of processes (:func:`global_batch`), and random augmentations are drawn per image and
  epoch (:class:`SeededViews`), so that N processes see the batches and crops one process sees;
- batch statistics (the linear head's BN, the encoder's BNs during semi-supervised
  fine-tuning) cover the whole global batch (:class:`GlobalBatchNorm`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import Config
from ..engine.distributed import DistInfo, init_distributed, resolve_device
from .common import EvalInputError, topk_correct

logger = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """The device, precision and memory format of one evaluation process, and its place among
    the evaluation's processes (``info``).

    ``amp_dtype`` (bf16, or None for fp32) applies to the encoder's forward only: kNN
    similarities, logits' top-k and every count are computed in fp32 / int64.
    """

    device: torch.device
    info: DistInfo = field(default_factory=DistInfo)
    amp_dtype: Optional[torch.dtype] = None
    memory_format: torch.memory_format = torch.contiguous_format
    owns_group: bool = False  # this context initialised torch.distributed

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "EvalContext":
        """One process, fp32, contiguous: the context of a call without one."""
        return cls(torch.device(device))

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")

    def autocast(self):
        """Autocast in ``amp_dtype`` for the encoder's forward (a no-op for fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def images(self, x: torch.Tensor, normalizer: nn.Module) -> torch.Tensor:
        """uint8 images of a batch -> normalised float images on the device, in the memory
        format of the model."""
        x = normalizer(x.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def shard(self, n: int) -> list[int]:
        return shard_indices(n, self.rank, self.world_size)

    def check_shardable(self, what: str, n: int) -> None:
        """One clear line when ``n`` images cannot give each process at least one."""
        if n < self.world_size:
            raise EvalInputError(f"{what} has {n} images, fewer than the {self.world_size} "
                                 "processes: run fewer processes")

    @property
    def _comm_device(self) -> torch.device:
        if self.world_size > 1 and dist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (``t`` itself for one process)."""
        if self.world_size <= 1:
            return t
        out = t.to(self._comm_device).clone()
        dist.all_reduce(out)
        return out.to(t.device)

    def gather_ordered(self, rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
        """Every process's ``rows`` (row j is item ``index[j]`` of a dataset of ``n``) as one
        (n, ...) tensor in dataset order, on every process, on ``rows``' device.

        Raises:
            RuntimeError: the processes' indices do not cover ``0..n-1`` exactly once.
        """
        out = rows.new_zeros((n, *rows.shape[1:]))
        seen = torch.zeros(n, dtype=torch.int64)
        if self.world_size <= 1:
            out[index.to(out.device)] = rows
            seen.index_add_(0, index.cpu(), torch.ones(index.numel(), dtype=torch.int64))
        else:
            dev = self._comm_device
            size = torch.tensor([rows.shape[0]], device=dev)
            sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
            dist.all_gather(sizes, size)
            m = int(max(s.item() for s in sizes))
            pad_rows = rows.new_zeros((m, *rows.shape[1:])).to(dev)
            pad_rows[: rows.shape[0]] = rows.to(dev)
            pad_index = torch.full((m,), -1, dtype=torch.int64, device=dev)
            pad_index[: index.numel()] = index.to(dev)
            all_rows = [torch.empty_like(pad_rows) for _ in range(self.world_size)]
            all_index = [torch.empty_like(pad_index) for _ in range(self.world_size)]
            dist.all_gather(all_rows, pad_rows)
            dist.all_gather(all_index, pad_index)
            for s, r, i in zip(sizes, all_rows, all_index):
                k = int(s.item())
                out[i[:k].to(out.device)] = r[:k].to(out.device)
                seen.index_add_(0, i[:k].cpu(), torch.ones(k, dtype=torch.int64))
        if not bool((seen == 1).all()):
            raise RuntimeError(f"gathered {int(seen.sum())} rows for {n} items "
                               f"({int((seen == 0).sum())} missing, "
                               f"{int((seen > 1).sum())} repeated)")
        return out

    def close(self) -> None:
        """Leave the process group this context joined (nothing for one process)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def eval_context(cfg: Config) -> EvalContext:
    """The evaluation context from the config and the launcher's environment.

    ``train.device`` picks the device; ``train.amp`` gives bf16 autocast on CUDA (and on CPU
    with ``train.amp_cpu``); ``train.channels_last`` lays images and model out channels-last
    where pretraining does (``trainer.CHANNELS_LAST_DEVICES``). Under ``torchrun``/``srun``
    the process joins the group (gloo on CPU, NCCL on CUDA) and takes its GPU.
    """
    from ..engine import trainer

    device = resolve_device(cfg.train.device)
    was = dist.is_available() and dist.is_initialized()
    info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", info.device_index)
    t = cfg.train
    amp = torch.bfloat16 if t.amp and (device.type == "cuda" or t.amp_cpu) else None
    fmt = (torch.channels_last if t.channels_last and device.type in trainer.CHANNELS_LAST_DEVICES
           else torch.contiguous_format)
    return EvalContext(device, info, amp, fmt, owns_group=info.world_size > 1 and not was)


def progress_bar(it, desc: str, show: bool):
    """``it`` under a tqdm bar when ``show`` (the main process of a run with progress)."""
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The items of a dataset of ``n`` that process ``rank`` of ``world`` evaluates:
    ``rank, rank + world, ...``. The shards partition ``range(n)``: no item is repeated."""
    return list(range(rank, n, world))


def global_batch(requested: int, n_images: int, ctx: EvalContext, key: str,
                 what: str) -> tuple[int, int]:
    """(per-process batch, global batch) for a training loader: ``requested`` images, or all
    ``n_images`` when fewer (rounded down to a multiple of the processes).

    Raises:
        EvalInputError: ``requested`` is not a multiple of the processes, or there are fewer
            images than processes.
    """
    w = ctx.world_size
    if requested % w:
        raise EvalInputError(f"config key '{key}' ({requested}) is the global batch and must be "
                             f"a multiple of the {w} processes")
    ctx.check_shardable(what, n_images)
    g = min(requested, n_images - n_images % w)
    return g // w, g


def train_sampler(dataset: Dataset, ctx: EvalContext, seed: int):
    """A shuffling ``DistributedSampler`` (also for one process, so that the order of images
    is a function of the seed and the epoch only) that drops the last ``len % world`` images."""
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                              seed=seed, drop_last=True)


class TensorBatches:
    """Batches of rows of equally long tensors (on any device) in a sampler's order, for
    drop_last training loops: what a DataLoader over a ``TensorDataset`` with that sampler and
    ``drop_last=True`` yields, with one indexing per tensor and batch instead of one per row.
    ``sampler`` is exposed for ``set_epoch``."""

    def __init__(self, tensors: Sequence[torch.Tensor], sampler, batch_size: int) -> None:
        self.tensors, self.sampler, self.batch_size = tuple(tensors), sampler, int(batch_size)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        for b in range(len(self)):
            pick = order[b * self.batch_size: (b + 1) * self.batch_size]
            yield tuple(t[pick.to(t.device)] for t in self.tensors)


class SeededViews(Dataset):
    """``dataset[i]`` drawn under torch's RNG seeded by (seed, epoch, i).

    A random crop then depends on the image and the epoch only, not on which process or
    DataLoader worker loads it or in which batch: N processes see the views one process sees.
    Call :meth:`set_epoch` before each epoch (before iterating its DataLoader).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        key = f"{self.seed}:{self.epoch}:{int(i)}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[i]


class GlobalBatchNorm(_BatchNorm):
    """Batch normalisation whose training-mode statistics cover the whole global batch.

    Each process sums its inputs per channel (in fp32) and the count; an autograd-aware
    all-reduce gives the global mean, and a second one the summed squared deviations from it
    (the variance), so the output, its gradient and the running statistics are those of one
    process holding the whole batch (a process may hold no image of a batch). One process, or eval mode: torch's batch norm.
    The state_dict is that of ``nn.BatchNorm*d``; momentum ``None`` keeps a cumulative average,
    as torch's does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least a 2D input (got {x.dim()}D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = self.num_features
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        # two passes (mean, then squared deviations from it): E[x^2] - E[x]^2 in fp32 loses
        # the variance of channels whose mean is large against their spread
        count = xf.new_full((1,), float(x.numel() // max(x.shape[1], 1)))
        total = self._sum(torch.cat([xf.sum(dims), count]))
        n = total[-1]
        mean = total[:c] / n
        centred = xf - mean.view(shape)
        var = self._sum((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), f)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), f)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the group's processes, differentiably, on ``t``'s device."""
        on_cuda = dist.get_backend(self.group) == "nccl"
        return _AllReduceSum.apply(t if on_cuda else t.cpu(), self.group).to(t.device)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient of each process's input is the sum of the
    processes' output gradients (each process's loss depends on every process's input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_global_bn(module: nn.Module, group=None) -> tuple[nn.Module, int, list[str]]:
    """``module`` with every plain ``nn.BatchNorm1d/2d/3d`` replaced by a
    :class:`GlobalBatchNorm` holding the same parameters and statistics.

    Returns:
        (the module, how many layers were replaced, names of BN subclasses left alone, e.g.
        timm's ``BatchNormAct2d``, whose statistics stay per process).
    """
    skipped: list[str] = []

    def convert(m: nn.Module, name: str) -> tuple[nn.Module, int]:
        if type(m) in PLAIN_BN:
            g = GlobalBatchNorm(m.num_features, m.eps, m.momentum, m.affine,
                                m.track_running_stats, group)
            g.load_state_dict(m.state_dict())
            g.train(m.training)
            return g.to(next(iter(m.state_dict().values()), torch.zeros(0)).device), 1
        if isinstance(m, _BatchNorm) and not isinstance(m, GlobalBatchNorm):
            skipped.append(name or type(m).__name__)
        done = 0
        for child_name, child in m.named_children():
            new, k = convert(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                setattr(m, child_name, new)
            done += k
        return m, done

    out, n = convert(module, "")
    return out, n, skipped


@torch.no_grad()
def sharded_features(encoder: nn.Module, dataset: Dataset, normalizer: nn.Module,
                     ctx: EvalContext, batch_size: int, workers: int = 0, progress: bool = False,
                     l2_normalize: bool = True,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled features (fp32, L2-normalised unless ``l2_normalize`` is False), labels and
    dataset indices of this process's shard of ``dataset``, on ``ctx.device``.

    The encoder runs in eval mode, under ``ctx.autocast()``; its mode is restored afterwards.
    """
    idx = ctx.shard(len(dataset))
    was = encoder.training
    encoder.eval()
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=ctx.device.type == "cuda")
    feats, labels = [], []
    for x, y in progress_bar(loader, desc, progress and ctx.is_main):
        with ctx.autocast():
            f = encoder(ctx.images(x, normalizer))
        f = f.float()
        feats.append(F.normalize(f, dim=1) if l2_normalize else f)
        labels.append(torch.as_tensor(y).to(ctx.device))
    encoder.train(was)
    if not feats:
        dim = getattr(encoder, "num_features", 0)
        return (torch.zeros(0, dim, device=ctx.device),
                torch.zeros(0, dtype=torch.long, device=ctx.device),
                torch.zeros(0, dtype=torch.long, device=ctx.device))
    return (torch.cat(feats), torch.cat(labels).long(),
            torch.as_tensor(idx, dtype=torch.long, device=ctx.device))


@torch.no_grad()
def knn_scores_sharded(train_feats: torch.Tensor, train_labels: torch.Tensor,
                       test_feats: torch.Tensor, num_classes: int, k: int, temperature: float,
                       ctx: EvalContext, n_train: int, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores (N_test, C) of every test feature against the training
    features held across the processes (this process holds ``train_feats``; ``n_train`` in
    all): each process takes the top k of its share, the processes exchange them, and the top
    k of those is the top k of the whole split. Similarities are fp32 matrix products.
    Every process returns the same scores.
    """
    k = min(k, n_train)
    out = []
    dev = train_feats.device
    for i in range(0, test_feats.shape[0], chunk):
        q = test_feats[i: i + chunk].to(dev)
        with torch.autocast(dev.type, enabled=False):
            sim = q.float() @ train_feats.float().T
        kl = min(k, sim.shape[1])
        top_sim, top_idx = sim.topk(kl, dim=1)
        top_lab = train_labels[top_idx]
        if ctx.world_size > 1:
            if kl < k:  # a small share: pad with candidates that are never chosen
                top_sim = torch.cat([top_sim, top_sim.new_full((q.shape[0], k - kl),
                                                               float("-inf"))], 1)
                top_lab = torch.cat([top_lab, top_lab.new_zeros((q.shape[0], k - kl))], 1)
            top_sim, top_lab = _gather_candidates(ctx, top_sim, top_lab)
            top_sim, pick = top_sim.topk(k, dim=1)
            top_lab = top_lab.gather(1, pick)
        weights = (top_sim / temperature).exp()  # (chunk, k), not a (chunk, k, C) one-hot
        out.append(weights.new_zeros(q.shape[0], num_classes).scatter_add_(1, top_lab, weights))
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=dev)


def _gather_candidates(ctx: EvalContext, sim: torch.Tensor,
                       lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dev = ctx._comm_device
    s, l_ = sim.to(dev).contiguous(), lab.to(dev).contiguous()
    all_s = [torch.empty_like(s) for _ in range(ctx.world_size)]
    all_l = [torch.empty_like(l_) for _ in range(ctx.world_size)]
    dist.all_gather(all_s, s)
    dist.all_gather(all_l, l_)
    return torch.cat(all_s, 1).to(sim.device), torch.cat(all_l, 1).to(sim.device)


@torch.no_grad()
def evaluate_sharded(model: nn.Module, dataset: Dataset, normalizer: nn.Module,
                     ctx: EvalContext, batch_size: int, workers: int = 0,
                     progress: bool = False) -> dict:
    """Top-1/top-5 (percent) of ``model`` (normalised images -> logits) over ``dataset``:
    each process evaluates its shard, the counts are summed, and the total is checked to be
    ``len(dataset)`` (every image exactly once).

    Returns:
        ``{"top1", "top5", "evaluated"}``.
    """
    model.eval()
    idx = ctx.shard(len(dataset))
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, num_workers=workers,
                        pin_memory=ctx.device.type == "cuda")
    counts = torch.zeros(3, dtype=torch.int64)
    for x, y in progress_bar(loader, "eval", progress and ctx.is_main):
        with ctx.autocast():
            logits = model(ctx.images(x, normalizer))
        a, b = topk_correct(logits.float().cpu(), torch.as_tensor(y))
        counts += torch.tensor([a, b, len(y)])
    counts = ctx.all_reduce_sum(counts)
    c1, c5, n = (int(v) for v in counts)
    if n != len(dataset):
        raise RuntimeError(f"evaluated {n} images of a split of {len(dataset)}")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "evaluated": n}


def aligned_batches(dataset: Dataset, indices: Sequence[int], batch: int, ctx: EvalContext,
                    workers: int = 0) -> DataLoader:
    """This process's part of each global batch of ``indices`` (items ``rank, rank + world,
    ...`` of it), in order, for work with collectives per batch such as
    :class:`GlobalBatchNorm` in train mode (the BN recount).

    Global batches hold ``batch`` images, and a shorter last one joins the batch before it:
    the recount averages batch statistics with equal weights, and a batch of one image has no
    spatial statistics in a 1x1 layer. With ``batch`` at least the number of processes, every
    process has a part of every batch, so all of them make the same number of calls.
    """
    indices = list(indices)
    chunks = [indices[s: s + batch] for s in range(0, len(indices), batch)]
    if len(chunks) > 1 and len(chunks[-1]) < batch:
        tail = chunks.pop()
        chunks[-1] = chunks[-1] + tail
    parts = [c[ctx.rank:: ctx.world_size] for c in chunks]
    if not all(parts):
        raise EvalInputError(f"{len(indices)} images in batches of {batch} leave a process "
                             f"of {ctx.world_size} without images: run fewer processes")
    return DataLoader(dataset, batch_sampler=parts, num_workers=workers)

"""Linear probe, kNN and semi-supervised fine-tuning of an exported encoder."""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import Config
from ..data.augment import Normalizer, eval_transform
from ..data.datasets import build_dataset
from ..engine.distributed import wrap_ddp
from ..models.schedules import cosine_decay
from .common import (
    check_finite,
    class_coverage,
    encoder_fingerprint,
    sanity_check_frozen,
    split_classes,
)
from .distributed import (
    EvalContext,
    TensorBatches,
    aligned_batches,
    convert_global_bn,
    evaluate_sharded,
    global_batch,
    progress_bar,
    SeededViews,
    sharded_features,
    train_sampler,
)
from .knn import knn_eval_encoder

logger = logging.getLogger(__name__)


def _res(cfg: Config) -> int:
    return cfg.eval.res or cfg.data.res


def train_transform(res: int) -> T.Compose:
    """Standard train-time crop + flip for linear evaluation and fine-tuning."""
    return T.Compose([
        T.RandomResizedCrop(res, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])


def _splits(cfg: Config) -> tuple[str, str]:
    train = cfg.data.knn_train_split or "train"
    val = cfg.eval.val_split or cfg.data.knn_test_split or "test"
    return train, val


def linear_probe(encoder: nn.Module, cfg: Config, device: torch.device, progress: bool = True,
                 ctx: Optional[EvalContext] = None) -> dict:
    """Frozen encoder -> BatchNorm1d (no affine) -> Linear; SGD 0.9, no wd, cosine lr from
    ``eval.linear_lr`` per 256 images of the global batch ``eval.batch_size``.

    Train-time crop and flip (``eval.linear_augment``) are drawn per image and epoch
    (:class:`~m2_pretrain.eval.distributed.SeededViews`); without them, features are computed
    once (sharded over the processes, then gathered: every process holds the whole split's
    features, ``N x dim x 4`` bytes). With ``ctx`` of several processes the head trains under
    DDP, its BN normalises by the global batch's statistics, and each process evaluates its
    shard of the validation split: the numbers are those of one process, up to float rounding.
    The run fails if any encoder weight or BN statistic changed.
    """
    ctx = ctx or EvalContext.single(device)
    e = cfg.eval
    res = _res(cfg)
    train_split, val_split = _splits(cfg)
    augment = e.linear_augment
    train_ds = build_dataset(cfg.data, train_split, train_transform(res) if augment else eval_transform(res))
    val_ds = build_dataset(cfg.data, val_split, eval_transform(res),
                           classes=split_classes(train_ds))
    classes = class_coverage(train_ds, val_ds)
    num_classes = classes["num_classes"]
    ctx.check_shardable(f"the evaluated split '{val_split}'", len(val_ds))
    local_bs, bs = global_batch(e.batch_size, len(train_ds), ctx, "eval.batch_size",
                                f"the training split '{train_split}'")
    dev = ctx.device
    norm = Normalizer(cfg.data.mean, cfg.data.std).to(dev)
    encoder = encoder.to(dev).eval()
    if ctx.memory_format == torch.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    for p in encoder.parameters():
        p.requires_grad_(False)
    before = encoder_fingerprint(encoder)
    dim = encoder.num_features
    head = linear_head(dim, num_classes).to(dev)
    if ctx.world_size > 1:
        head = convert_global_bn(head)[0]
    workers = cfg.data.workers
    if augment:
        data = SeededViews(train_ds, cfg.train.seed)

        def features(x):
            with torch.no_grad(), ctx.autocast():
                return encoder(ctx.images(x, norm)).float()
    else:
        f, lab, idx = sharded_features(encoder, train_ds, norm, ctx, e.batch_size, workers,
                                       progress, l2_normalize=False,
                                       desc=f"features {train_split}")
        data = TensorDataset(ctx.gather_ordered(f, idx, len(train_ds)),
                             ctx.gather_ordered(lab, idx, len(train_ds)))

        def features(x):
            return x.to(dev)

    sampler = train_sampler(data, ctx, cfg.train.seed)
    if augment:
        train_loader = DataLoader(data, batch_size=local_bs, sampler=sampler, drop_last=True,
                                  num_workers=workers, pin_memory=dev.type == "cuda")
    else:  # one gather per batch: a DataLoader would index the rows one by one
        train_loader = TensorBatches(data.tensors, sampler, local_bs)
    lr = e.linear_lr * bs / 256
    total = max(int(round(e.linear_epochs * len(train_loader))), 1)
    step_head = _ddp(head, ctx)
    train_linear_head(step_head, train_loader, features, total, lr, dev,
                      progress and ctx.is_main)
    check_finite("linear probe", [(f"head.{k}", v) for k, v in head.state_dict().items()],
                 "the probe diverged: lower eval.linear_lr")
    numbers = evaluate_sharded(_Probe(encoder, head), val_ds, norm, ctx, e.batch_size,
                               cfg.data.workers, progress)
    sanity_check_frozen(encoder, before)
    numbers.update({"features_precomputed": not augment, "steps": total, "lr": lr,
                    "global_batch": bs, "train_images": len(train_ds),
                    "val_images": len(val_ds), **classes, **_run_facts(ctx)})
    return numbers


def _run_facts(ctx: EvalContext) -> dict:
    return {"world_size": ctx.world_size, "precision": ctx.precision,
            "channels_last": ctx.memory_format == torch.channels_last}


def _ddp(module: nn.Module, ctx: EvalContext) -> nn.Module:
    """``module`` under DDP for several processes (BN statistics are global already: no
    buffer broadcast), ``module`` itself for one."""
    return wrap_ddp(module, ctx.info, ctx.device.type == "cuda") or module


class _Probe(nn.Module):
    """Normalised images -> frozen encoder (under the caller's autocast) -> fp32 head."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x).float()
        with torch.autocast(x.device.type, enabled=False):
            return self.head(f)


def linear_head(dim: int, num_classes: int, generator: Optional[torch.Generator] = None) -> nn.Module:
    """The probe's head: BatchNorm1d without affine, then a linear layer (weights N(0, 0.01),
    bias 0; drawn from ``generator`` when given)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
    nn.init.normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    return head


def train_linear_head(head: nn.Module, loader, features, total_steps: int, lr: float,
                      device: torch.device, progress: bool = False) -> nn.Module:
    """``total_steps`` of SGD (momentum 0.9, no weight decay, cosine lr from ``lr``) on
    cross-entropy of ``head(features(x))`` over ``loader``'s ``(x, y)`` batches, epoch after
    epoch; returns ``head`` in eval mode."""
    head.train()
    sgd_cosine(head.parameters(), loader,
               lambda x, y: F.cross_entropy(head(features(x)), torch.as_tensor(y).to(device)),
               total_steps, lr, "linear", progress)
    return head.eval()


def sgd_cosine(params, loader, loss_fn: Callable, total_steps: int, lr: float, desc: str,
               progress: bool = False) -> None:
    """``total_steps`` of SGD (momentum 0.9, no weight decay) on ``params`` with a cosine
    learning rate from ``lr`` to 0, minimising ``loss_fn(x, y)`` over ``loader``'s batches
    epoch after epoch (the linear probe's and the semi-supervised fine-tuning's loop). The
    loader's sampler and dataset are told the epoch where they take it (``set_epoch``)."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    step = 0
    for epoch in progress_bar(range(math.ceil(total_steps / len(loader))), desc, progress):
        for owner in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
            if hasattr(owner, "set_epoch"):  # DistributedSampler, SeededViews
                owner.set_epoch(epoch)
        for x, y in loader:
            if step >= total_steps:
                break
            for g in opt.param_groups:
                g["lr"] = cosine_decay(step, total_steps, lr)
            loss = loss_fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1


def raw_features(encoder, dataset, norm, device, batch_size, workers=0):
    """Pooled features, not L2-normalised (the linear head's BN does the scaling), and labels,
    of ``dataset``'s ``(uint8 image, label)`` pairs in order, on the CPU (one process, eval
    mode: :func:`~m2_pretrain.eval.distributed.sharded_features`)."""
    f, labels, _ = sharded_features(encoder, dataset, norm, EvalContext.single(device),
                                    batch_size, workers, l2_normalize=False)
    return f.cpu(), labels.cpu()


def knn_eval(encoder: nn.Module, cfg: Config, device: torch.device, progress: bool = True,
             ctx: Optional[EvalContext] = None) -> dict:
    """Weighted kNN (cosine, ``knn.k``, ``knn.temperature``) on the train/val splits, sharded
    over ``ctx``'s processes (see :func:`~m2_pretrain.eval.knn.knn_eval_encoder`)."""
    ctx = ctx or EvalContext.single(device)
    train_split, val_split = _splits(cfg)
    numbers = knn_eval_encoder(encoder, cfg.data, cfg.knn, ctx.device, _res(cfg), train_split,
                               val_split, cfg.eval.batch_size, progress and ctx.is_main, ctx)
    numbers.update({"k": cfg.knn.k, "temperature": cfg.knn.temperature, **_run_facts(ctx)})
    return numbers


@torch.no_grad()
def recount_bn_statistics(model: nn.Module, loader, normalizer, device,
                          ctx: Optional[EvalContext] = None) -> int:
    """Reset every BN's running statistics and recompute them as exact averages over
    ``loader``'s batches (train-mode forward, no gradient; under ``ctx``'s autocast and memory
    format when given). Returns the number of BN layers recounted."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = []
    for m in bns:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over batches
    ctx = ctx or EvalContext.single(device)
    was = model.training
    model.train()
    for x, _ in loader:
        with ctx.autocast():
            model(ctx.images(x, normalizer))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was)
    return len(bns)


def semi_finetune(encoder: nn.Module, cfg: Config, indices: list[int], device: torch.device,
                  progress: bool = True, ctx: Optional[EvalContext] = None) -> dict:
    """Fine-tune encoder + linear head on the labelled subset ``indices`` of the train split
    (SGD 0.9, cosine lr ``eval.semi_lr`` at ``eval.semi_batch_size``, the global batch),
    recount BN statistics on that subset, report top-1/top-5.

    With ``ctx`` of several processes the model trains under DDP; with ``eval.semi_global_bn``
    (the default) its BN layers normalise by the global batch's statistics
    (:class:`~m2_pretrain.eval.distributed.GlobalBatchNorm`), for training and for the
    recount, so the numbers are those of one process up to float rounding. Crops are drawn per
    image and epoch (:class:`~m2_pretrain.eval.distributed.SeededViews`).
    """
    ctx = ctx or EvalContext.single(device)
    e = cfg.eval
    res = _res(cfg)
    train_split, val_split = _splits(cfg)
    train_full = build_dataset(cfg.data, train_split, train_transform(res))
    recount_full = build_dataset(cfg.data, train_split, eval_transform(res))
    val_ds = build_dataset(cfg.data, val_split, eval_transform(res),
                           classes=split_classes(train_full))
    classes = class_coverage(train_full, val_ds)
    num_classes = classes["num_classes"]
    ctx.check_shardable(f"the evaluated split '{val_split}'", len(val_ds))
    subset = Subset(train_full, indices)
    local_bs, bs = global_batch(e.semi_batch_size, len(subset), ctx, "eval.semi_batch_size",
                                "the labelled split")
    lr = e.semi_lr * bs / e.semi_batch_size
    dev = ctx.device
    norm = Normalizer(cfg.data.mean, cfg.data.std).to(dev)
    encoder = encoder.to(dev)
    for p in encoder.parameters():
        p.requires_grad_(True)
    head = nn.Linear(encoder.num_features, num_classes).to(dev)
    model = nn.Sequential(encoder, head)
    if ctx.memory_format == torch.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_bn = ctx.world_size > 1 and e.semi_global_bn
    if global_bn:
        model, _, skipped = convert_global_bn(model)
        if skipped:
            logger.warning("BN layers of a subclass keep per-process statistics: %s",
                           ", ".join(skipped[:5]))
    step_model = _ddp(model, ctx)
    data = SeededViews(subset, cfg.train.seed)
    sampler = train_sampler(data, ctx, cfg.train.seed)
    loader = DataLoader(data, batch_size=local_bs, sampler=sampler,
                        drop_last=len(sampler) > local_bs, num_workers=cfg.data.workers,
                        pin_memory=dev.type == "cuda")
    total = max(int(round(e.semi_epochs * len(loader))), 1)

    def loss_fn(x, y):
        with ctx.autocast():
            logits = step_model(ctx.images(x, norm))
        return F.cross_entropy(logits.float(), torch.as_tensor(y).to(dev))

    model.train()
    sgd_cosine(step_model.parameters(), loader, loss_fn, total, lr, "semi",
               progress and ctx.is_main)
    if global_bn:  # global batches, as in training
        recount = aligned_batches(recount_full, indices, bs, ctx, cfg.data.workers)
    else:  # each process recounts on its shard; the statistics are averaged below
        recount = aligned_batches(recount_full, [indices[i] for i in ctx.shard(len(indices))],
                                  local_bs, EvalContext.single(dev), cfg.data.workers)
    n_bn = recount_bn_statistics(model[0], recount, norm, dev, ctx)
    if ctx.world_size > 1 and not global_bn:  # the mean of the processes' recounts
        _average_bn_statistics(model[0], ctx)
    check_finite("semi-supervised fine-tuning", model.state_dict().items(),
                 "the fine-tuning diverged: lower eval.semi_lr")
    numbers = evaluate_sharded(model, val_ds, norm, ctx, e.batch_size, cfg.data.workers,
                               progress)
    numbers.update({"steps": total, "lr": lr, "global_batch": bs,
                    "labelled_images": len(indices), "bn_layers_recounted": n_bn,
                    "global_bn": global_bn, "val_images": len(val_ds), **classes,
                    **_run_facts(ctx)})
    return numbers


def _average_bn_statistics(model: nn.Module, ctx: EvalContext) -> None:
    """Every BN's running mean and variance averaged over the processes."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                buf.copy_(ctx.all_reduce_sum(buf.detach().clone()) / ctx.world_size)

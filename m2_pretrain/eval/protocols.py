"""Linear probe, kNN and semi-supervised fine-tuning of an exported encoder."""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import Config
from ..data.augment import Normalizer, eval_transform
from ..data.datasets import build_dataset
from ..models.schedules import cosine_decay
from .common import (
    check_finite,
    class_coverage,
    encoder_fingerprint,
    sanity_check_frozen,
    split_classes,
    topk_correct,
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


def _bar(it, desc: str, progress: bool, total: Optional[int] = None):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


@torch.no_grad()
def _evaluate(model: nn.Module, loader, device, progress: bool) -> dict[str, float]:
    """Top-1/top-5 (percent) of ``model`` (which takes uint8 images) over ``loader``."""
    model.eval()
    c1 = c5 = n = 0
    for x, y in _bar(loader, "eval", progress):
        logits = model(x.to(device))
        a, b = topk_correct(logits.float().cpu(), torch.as_tensor(y))
        c1, c5, n = c1 + a, c5 + b, n + len(y)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def linear_probe(encoder: nn.Module, cfg: Config, device: torch.device, progress: bool = True) -> dict:
    """Frozen encoder -> BatchNorm1d (no affine) -> Linear; SGD 0.9, no wd, cosine lr.

    Features are precomputed once when ``eval.linear_augment`` is false. The run fails if any
    encoder weight or BN statistic changed.
    """
    e = cfg.eval
    res = _res(cfg)
    train_split, val_split = _splits(cfg)
    augment = e.linear_augment
    train_ds = build_dataset(cfg.data, train_split, train_transform(res) if augment else eval_transform(res))
    val_ds = build_dataset(cfg.data, val_split, eval_transform(res),
                           classes=split_classes(train_ds))
    classes = class_coverage(train_ds, val_ds)
    num_classes = classes["num_classes"]
    norm = Normalizer(cfg.data.mean, cfg.data.std).to(device)
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    before = encoder_fingerprint(encoder)
    dim = encoder.num_features
    head = linear_head(dim, num_classes).to(device)

    bs = min(e.batch_size, len(train_ds))
    if augment:
        train_loader = DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True,
                                  num_workers=cfg.data.workers, pin_memory=device.type == "cuda")

        def features(x):
            with torch.no_grad():
                return encoder(norm(x.to(device, non_blocking=True))).float()
    else:
        ftr, ltr = raw_features(encoder, train_ds, norm, device, e.batch_size, cfg.data.workers)
        train_loader = DataLoader(TensorDataset(ftr, ltr), batch_size=bs, shuffle=True, drop_last=True)

        def features(x):
            return x.to(device)

    lr = e.linear_lr * bs / 256
    total = max(int(round(e.linear_epochs * len(train_loader))), 1)
    train_linear_head(head, train_loader, features, total, lr, device, progress)
    check_finite("linear probe", [(f"head.{k}", v) for k, v in head.state_dict().items()],
                 "the probe diverged: lower eval.linear_lr")
    val_loader = DataLoader(val_ds, batch_size=e.batch_size, num_workers=cfg.data.workers)
    model = nn.Sequential(_Normalised(encoder, norm), head)
    numbers = _evaluate(model, val_loader, device, progress)
    sanity_check_frozen(encoder, before)
    numbers.update({"features_precomputed": not augment, "steps": total, "lr": lr,
                    "train_images": len(train_ds), "val_images": len(val_ds), **classes})
    return numbers


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
    epoch after epoch (the linear probe's and the semi-supervised fine-tuning's loop)."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    step = 0
    for _ in _bar(range(math.ceil(total_steps / len(loader))), desc, progress):
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


class _Normalised(nn.Module):
    """uint8 images -> normalised -> encoder."""

    def __init__(self, encoder, norm):
        super().__init__()
        self.encoder, self.norm = encoder, norm

    def forward(self, x):
        return self.encoder(self.norm(x))


@torch.no_grad()
def raw_features(encoder, dataset, norm, device, batch_size, workers=0):
    """Pooled features, not L2-normalised (the linear head's BN does the scaling), and labels,
    of ``dataset``'s ``(uint8 image, label)`` pairs in order."""
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        feats.append(encoder(norm(x.to(device))).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()


def knn_eval(encoder: nn.Module, cfg: Config, device: torch.device, progress: bool = True) -> dict:
    """Weighted kNN (cosine, ``knn.k``, ``knn.temperature``) on the train/val splits."""
    train_split, val_split = _splits(cfg)
    numbers = knn_eval_encoder(encoder, cfg.data, cfg.knn, device, _res(cfg), train_split,
                               val_split, cfg.eval.batch_size, progress)
    numbers.update({"k": cfg.knn.k, "temperature": cfg.knn.temperature})
    return numbers


@torch.no_grad()
def recount_bn_statistics(model: nn.Module, loader, normalizer, device) -> int:
    """Reset every BN's running statistics and recompute them as exact averages over ``loader``
    (train-mode forward, no gradient). Returns the number of BN layers recounted."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = []
    for m in bns:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over batches
    was = model.training
    model.train()
    for x, _ in loader:
        model(normalizer(x.to(device)))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was)
    return len(bns)


def semi_finetune(encoder: nn.Module, cfg: Config, indices: list[int], device: torch.device,
                  progress: bool = True) -> dict:
    """Fine-tune encoder + linear head on the labelled subset ``indices`` of the train split
    (SGD 0.9, cosine lr), recount BN statistics on that subset, report top-1/top-5."""
    e = cfg.eval
    res = _res(cfg)
    train_split, val_split = _splits(cfg)
    train_full = build_dataset(cfg.data, train_split, train_transform(res))
    recount_full = build_dataset(cfg.data, train_split, eval_transform(res))
    val_ds = build_dataset(cfg.data, val_split, eval_transform(res),
                           classes=split_classes(train_full))
    classes = class_coverage(train_full, val_ds)
    num_classes = classes["num_classes"]
    subset = Subset(train_full, indices)
    norm = Normalizer(cfg.data.mean, cfg.data.std).to(device)
    encoder = encoder.to(device)
    for p in encoder.parameters():
        p.requires_grad_(True)
    head = nn.Linear(encoder.num_features, num_classes).to(device)
    model = nn.Sequential(encoder, head)
    bs = min(e.semi_batch_size, len(subset))
    lr = e.semi_lr * bs / e.semi_batch_size
    loader = DataLoader(subset, batch_size=bs, shuffle=True, drop_last=len(subset) > bs,
                        num_workers=cfg.data.workers, pin_memory=device.type == "cuda")
    total = max(int(round(e.semi_epochs * len(loader))), 1)
    model.train()
    sgd_cosine(model.parameters(), loader,
               lambda x, y: F.cross_entropy(model(norm(x.to(device))), torch.as_tensor(y).to(device)),
               total, lr, "semi", progress)
    recount_loader = DataLoader(Subset(recount_full, indices), batch_size=bs, shuffle=False,
                                num_workers=cfg.data.workers)
    n_bn = recount_bn_statistics(encoder, recount_loader, norm, device)
    check_finite("semi-supervised fine-tuning", model.state_dict().items(),
                 "the fine-tuning diverged: lower eval.semi_lr")
    val_loader = DataLoader(val_ds, batch_size=e.batch_size, num_workers=cfg.data.workers)
    numbers = _evaluate(nn.Sequential(_Normalised(encoder, norm), head), val_loader, device, progress)
    numbers.update({"steps": total, "lr": lr, "labelled_images": len(indices),
                    "bn_layers_recounted": n_bn, "val_images": len(val_ds), **classes})
    return numbers

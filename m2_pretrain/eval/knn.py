"""Weighted kNN classification on frozen features (InstDisc / DINO protocol)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    normalizer: nn.Module,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of ``dataset`` (uint8 image tensors) in eval mode.

    The encoder's train/eval mode is restored afterwards.
    """
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, labels = [], []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="features", leave=False)
    for x, y in it:
        f = encoder(normalizer(x.to(device, non_blocking=True)))
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test, C): sum over the k most cosine-similar training samples of
    ``exp(sim / T)``, per class."""
    k = min(k, train_feats.shape[0])
    scores = []
    for i in range(0, test_feats.shape[0], chunk):
        sim = test_feats[i : i + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        onehot = F.one_hot(train_labels[top_idx], num_classes).float()
        scores.append((onehot * weights.unsqueeze(-1)).sum(1))
    return torch.cat(scores)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: Optional[int] = None,
    k: int = 200,
    temperature: float = 0.1,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted kNN classifier."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top == test_labels.unsqueeze(1)
    return {
        "top1": 100.0 * correct[:, 0].float().mean().item(),
        "top5": 100.0 * correct.any(1).float().mean().item(),
    }


def knn_eval_encoder(encoder: nn.Module, data_cfg, knn_cfg, device: torch.device,
                     encoder_res: Optional[int] = None, train_split: Optional[str] = None,
                     test_split: Optional[str] = None, batch_size: int = 256,
                     progress: bool = False) -> dict[str, float]:
    """kNN top-1/top-5 of ``encoder`` (eval mode) on ``data_cfg``'s kNN splits (or the given
    ones), on the whole training split, or a fixed random subset of ``knn_cfg.max_train``
    images when that is > 0 (``train_subsampled_from`` in the result then gives the split's
    size). Labels of both splits are numbered by the training split's class list.
    """
    from ..data.augment import Normalizer, eval_transform
    from ..data.datasets import build_dataset
    from .common import check_finite, class_coverage, split_classes

    train_split = train_split or data_cfg.knn_train_split
    test_split = test_split or data_cfg.knn_test_split or train_split
    if not train_split:
        raise ValueError("set data.knn_train_split (and data.knn_test_split) for kNN evaluation")
    tf = eval_transform(encoder_res or data_cfg.res)
    train = build_dataset(data_cfg, train_split, tf)
    test = build_dataset(data_cfg, test_split, tf, classes=split_classes(train))
    classes = class_coverage(train, test)
    full = len(train)
    if 0 < knn_cfg.max_train < full:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(train), generator=g)[: knn_cfg.max_train].tolist()
        train = torch.utils.data.Subset(train, idx)
    norm = Normalizer(data_cfg.mean, data_cfg.std).to(device)
    encoder = encoder.to(device)
    ftr, ltr = extract_features(encoder, train, norm, device, batch_size, data_cfg.workers, progress)
    fte, lte = extract_features(encoder, test, norm, device, batch_size, data_cfg.workers, progress)
    check_finite("kNN", [(f"features of the {train_split} split", ftr),
                         (f"features of the {test_split} split", fte)],
                 "the encoder's weights or statistics are broken")
    out = knn_accuracy(ftr, ltr, fte, lte, num_classes=classes["num_classes"], k=knn_cfg.k,
                       temperature=knn_cfg.temperature)
    out.update({"train_images": len(train), "val_images": len(test), **classes})
    if len(train) < full:
        out["train_subsampled_from"] = full
    return out


def knn_monitor(trainer) -> list:
    """The kNN top-1/top-5 of the method's evaluated encoder (the one export writes by
    default) every ``knn.every_epochs`` epochs as a trainer hook (none
    when ``knn.every_epochs`` is 0 or ``data.knn_train_split`` is empty); the numbers go to the
    history row as ``knn_top1``/``knn_top5`` and to TensorBoard as ``knn/top1``/``knn/top5``."""
    import logging

    from ..engine.hooks import PeriodicHook

    cfg = trainer.cfg
    if cfg.knn.every_epochs <= 0 or not cfg.data.knn_train_split:
        return []
    every = max(int(round(cfg.knn.every_epochs * trainer.steps_per_epoch)), 1)

    def knn(tr) -> dict[str, float]:
        res = knn_eval_encoder(tr.model.evaluated_encoder(), cfg.data, cfg.knn, tr.device)
        logging.getLogger(__name__).info("step %d: kNN top-1 %.2f top-5 %.2f", tr.step,
                                         res["top1"], res["top5"])
        return {"top1": res["top1"], "top5": res["top5"]}

    return [PeriodicHook("knn", every, knn)]

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

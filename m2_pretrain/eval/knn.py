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
                     progress: bool = False, ctx=None) -> dict:
    """kNN top-1/top-5 of ``encoder`` (eval mode) on ``data_cfg``'s kNN splits (or the given
    ones), on the whole training split, or a fixed random subset of ``knn_cfg.max_train``
    images when that is > 0 (``train_subsampled_from`` in the result then gives the split's
    size). Labels of both splits are numbered by the training split's class list.

    With an :class:`~m2_pretrain.eval.distributed.EvalContext` ``ctx`` of several processes,
    each process extracts the features of its shard of both splits; the test features are
    gathered, and each process's top k of its training shard are merged into the top k of the
    whole split (:func:`~m2_pretrain.eval.distributed.knn_scores_sharded`). Every process
    returns the same numbers. Without ``ctx``: one process on ``device``, fp32.
    """
    from ..data.augment import Normalizer, eval_transform
    from ..data.datasets import build_dataset
    from .common import EvalInputError, class_coverage, split_classes
    from .distributed import EvalContext, knn_scores_sharded, sharded_features

    ctx = ctx or EvalContext.single(device)
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
    ctx.check_shardable(f"the kNN training split '{train_split}'", len(train))
    ctx.check_shardable(f"the evaluated split '{test_split}'", len(test))
    norm = Normalizer(data_cfg.mean, data_cfg.std).to(ctx.device)
    encoder = encoder.to(ctx.device)
    if ctx.memory_format == torch.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    ftr, ltr, _ = sharded_features(encoder, train, norm, ctx, batch_size, data_cfg.workers,
                                   progress, desc=f"features {train_split}")
    fte, lte, ite = sharded_features(encoder, test, norm, ctx, batch_size, data_cfg.workers,
                                     progress, desc=f"features {test_split}")
    for split, f in ((train_split, ftr), (test_split, fte)):
        # summed over the processes: every process stops, not only the one that saw it
        if ctx.all_reduce_sum(torch.tensor([int(not bool(torch.isfinite(f).all()))])).item():
            raise EvalInputError(f"kNN: features of the {split} split hold NaN or inf values; "
                                 "no result is reported (the encoder's weights or statistics "
                                 "are broken)")
    fte = ctx.gather_ordered(fte, ite, len(test))
    lte = ctx.gather_ordered(lte, ite, len(test))
    scores = knn_scores_sharded(ftr, ltr, fte, classes["num_classes"], knn_cfg.k,
                                knn_cfg.temperature, ctx, n_train=len(train))
    top = scores.topk(min(5, classes["num_classes"]), dim=1).indices
    correct = top == lte.unsqueeze(1)
    out = {"top1": 100.0 * correct[:, 0].double().mean().item(),
           "top5": 100.0 * correct.any(1).double().mean().item(),
           "train_images": len(train), "val_images": len(test), **classes}
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

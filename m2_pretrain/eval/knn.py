"""Weighted kNN classification on frozen features (InstDisc / DINO protocol)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: Optional[int] = None,
    k: int = 200,
    temperature: float = 0.1,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted kNN classifier: for each test
    feature, the sum per class of ``exp(sim / T)`` over its k most cosine-similar training
    features (one process; see :func:`knn_eval_encoder` for many)."""
    from .distributed import EvalContext, knn_scores_sharded

    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores_sharded(train_feats, train_labels, test_feats, num_classes, k,
                                temperature, EvalContext.single(train_feats.device),
                                n_train=train_feats.shape[0])
    return score_accuracy(scores, test_labels)


def score_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of class ``scores`` (N, C) against ``labels``."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    correct = top == labels.to(top.device).unsqueeze(1)
    return {"top1": 100.0 * correct[:, 0].double().mean().item(),
            "top5": 100.0 * correct.any(1).double().mean().item()}


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
    out = {**score_accuracy(scores, lte), "train_images": len(train), "val_images": len(test),
           **classes}
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

"""Seeded fine-tuning on CPU is reproducible: two ``train_net`` runs with the same ``SEED``
(random init, shuffled sampler, random resize and flip, a loader worker process) give the same
losses at every iteration; another seed gives other losses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import m2_detectron2  # noqa: F401  (stand-in first)
from detectron2.data import DatasetCatalog

from d2_data import write_detection_set
from m2_detectron2.data import register_coco_spec
from m2_detectron2.train import Trainer, main

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("total_loss", "loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls")


def _losses_of_run(tmp_path, monkeypatch, seed: int, name: str,
                   iters: int = 3) -> dict[str, list[float]]:
    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    seen = {}

    def after_train(self):
        seen.update({k: [v for v, _ in self.storage.history(k).values()] for k in LOSSES})

    monkeypatch.setattr(Trainer, "after_train", after_train)  # skips the final evaluation
    args = train_net.parse_args([
        "--config-file", str(REPO / "configs" / "detectron2" / "demo_shapes_mask_rcnn_R18.yaml"),
        "M2.RANDOM_INIT", "True", "SEED", str(seed),
        "DATASETS.TRAIN", "('m2det_train',)", "DATASETS.TEST", "('m2det_train',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "INPUT.MIN_SIZE_TRAIN", "(64, 72, 80)", "INPUT.MAX_SIZE_TRAIN", "112",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "1", "OUTPUT_DIR", str(tmp_path / name)])
    main(args)
    assert all(len(v) == iters for v in seen.values()), seen
    return seen


def test_seeded_train_net_runs_give_equal_losses(tmp_path, monkeypatch):
    if "m2det_train" not in DatasetCatalog.list():
        ann, img_root = write_detection_set(tmp_path / "coco", "train", 6, [1, 2, 3], seed=3)
        register_coco_spec(f"m2det_train={ann}:{img_root}")
    a = _losses_of_run(tmp_path, monkeypatch, 0, "a")
    b = _losses_of_run(tmp_path, monkeypatch, 0, "b")
    assert a == b  # bit for bit
    c = _losses_of_run(tmp_path, monkeypatch, 1, "c", iters=1)  # another init and sampler
    assert c["total_loss"][0] != a["total_loss"][0]

"""Evaluators: COCO (pycocotools when Detectron2's C++ evaluator is missing) and LVIS.

``lvis`` 0.5.3, the newest release on PyPI, calls ``np.float`` in ``LVISEval.accumulate``;
numpy 1.24 removed that alias (upstream fixed it in the lvis-api repository but never
released). :func:`lvis_numpy_compat` restores the alias for the duration of an LVIS
evaluation only, and only when numpy lacks it.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, LVISEvaluator

from . import HAS_CPP_OPS

logger = logging.getLogger(__name__)
_warned_slow_coco = False


@contextlib.contextmanager
def lvis_numpy_compat():
    """Provide ``np.float`` (= builtin float, what it aliased) while the block runs, if numpy
    does not define it; removes it again afterwards. No effect on numpy < 1.24."""
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added and "float" in np.__dict__:
            del np.float  # type: ignore[attr-defined]


class LVISEvaluatorCompat(LVISEvaluator):
    """Detectron2's LVIS evaluator, run under :func:`lvis_numpy_compat`."""

    def evaluate(self):
        with lvis_numpy_compat():
            return super().evaluate()


def _tasks(cfg) -> tuple[str, ...]:
    return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)


def build_evaluator(cfg, dataset_name: str, output_folder: str | None = None):
    """COCO evaluator for COCO-format datasets, LVIS evaluator for LVIS ones."""
    global _warned_slow_coco
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if evaluator_type == "lvis":
        return LVISEvaluatorCompat(dataset_name, _tasks(cfg), distributed=True,
                                   output_dir=output_folder,
                                   max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    if evaluator_type != "coco":
        raise ValueError(f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; "
                         "this plugin evaluates COCO- and LVIS-format datasets")
    if not HAS_CPP_OPS and not _warned_slow_coco:
        logger.warning("Detectron2's C++ COCO evaluator is not available (detectron2 was "
                       "installed without its extension): using pycocotools' COCOeval, "
                       "which gives the same numbers more slowly.")
        _warned_slow_coco = True
    return COCOEvaluator(dataset_name, _tasks(cfg), distributed=True, output_dir=output_folder,
                         max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
                         use_fast_impl=HAS_CPP_OPS)

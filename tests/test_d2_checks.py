"""Setup checks of transfer configs: empty weights need M2.RANDOM_INIT, and the class count the
meta-architecture really reads must match the training dataset (no model is built)."""

from __future__ import annotations

from pathlib import Path

import pytest

import m2_detectron2  # noqa: F401  (stand-in first)
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2_data import write_detection_set
from m2_detectron2.checks import SetupError, check_num_classes
from m2_detectron2.data import register_coco_spec
from m2_detectron2.train import build_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detectron2"
NAME = "m2checks_3cat_train"
KEYS = ["MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES", "MODEL.FCOS.NUM_CLASSES"]


@pytest.fixture(scope="module")
def three_categories(tmp_path_factory):
    """A COCO-format set with 3 categories, registered from its json (no thing_classes until
    Detectron2 loads it)."""
    if NAME not in DatasetCatalog.list():
        ann, img_root = write_detection_set(tmp_path_factory.mktemp("d2checks"), "train", 2,
                                            [1, 2, 3])
        register_coco_spec(f"{NAME}={ann}:{img_root}")
    return ["DATASETS.TRAIN", f"('{NAME}',)", "DATASETS.TEST", "()"]


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_empty_weights_need_explicit_random_init(three_categories, tmp_path):
    opts = three_categories + ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "OUTPUT_DIR", str(tmp_path)]
    cfg_file = str(CONFIGS / "mask_rcnn_R50_FPN_1x.yaml")
    with pytest.raises(SetupError) as e:
        build_config(cfg_file, opts)
    assert _one_line(e).startswith("MODEL.WEIGHTS is empty: ")
    assert "M2.RANDOM_INIT True" in str(e.value)
    cfg = build_config(cfg_file, opts + ["M2.RANDOM_INIT", "True"])
    assert cfg.M2.RANDOM_INIT and cfg.MODEL.WEIGHTS == ""
    # --resume with a checkpoint in OUTPUT_DIR: the checkpoint replaces the initial weights
    with pytest.raises(SetupError, match="MODEL.WEIGHTS is empty"):
        build_config(cfg_file, opts, resume=True)
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    assert build_config(cfg_file, opts, resume=True).MODEL.WEIGHTS == ""

    timm_file = str(CONFIGS / "mask_rcnn_timm_FPN_1x.yaml")
    with pytest.raises(SetupError) as e:
        build_config(timm_file, opts)
    assert _one_line(e).startswith("MODEL.TIMM.WEIGHTS is empty: ")
    assert "M2.RANDOM_INIT True" in str(e.value)
    with pytest.raises(SetupError, match="MODEL.TIMM.WEIGHTS=.*does not exist"):
        build_config(timm_file, opts + ["MODEL.TIMM.WEIGHTS", str(tmp_path / "nope.pth")])
    (tmp_path / "enc.pth").write_bytes(b"")
    build_config(timm_file, opts + ["MODEL.TIMM.WEIGHTS", str(tmp_path / "enc.pth")])
    build_config(timm_file, opts + ["M2.RANDOM_INIT", "True"])


@pytest.mark.parametrize("config,key", [
    ("mask_rcnn_R50_FPN_1x.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("cascade_mask_rcnn_R50_FPN_1x.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("mask_rcnn_R50_FPN_2x_lvis_v0.5.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("retinanet_R50_FPN_1x.yaml", "MODEL.RETINANET.NUM_CLASSES"),
    ("fcos_R50_FPN_1x.yaml", "MODEL.FCOS.NUM_CLASSES"),
])
def test_class_count_read_from_the_key_the_model_uses(config, key, three_categories):
    opts = three_categories + ["M2.RANDOM_INIT", "True"]
    others = [k for k in KEYS if k != key]
    # the keys this meta-architecture does not read are set right: only `key` counts
    wrong = opts + sum(([k, "3"] for k in others), [])
    with pytest.raises(SetupError) as e:
        build_config(str(CONFIGS / config), wrong)
    default = 1230 if "lvis" in config else 80
    assert _one_line(e) == (f"{key} is {default} but training dataset {NAME} has 3 "
                            f"categories: set {key} 3")
    cfg = build_config(str(CONFIGS / config), wrong + [key, "3"])
    assert len(MetadataCatalog.get(NAME).thing_classes) == 3 and cfg.DATASETS.TRAIN == (NAME,)


def test_builtin_datasets_checked_from_metadata_without_loading():
    """COCO 2017 is not on disk here: its categories come from the builtin metadata."""
    cfg = build_config(str(CONFIGS / "fcos_R50_FPN_1x.yaml"), ["M2.RANDOM_INIT", "True"])
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    cfg.defrost()
    cfg.MODEL.FCOS.NUM_CLASSES = 81
    with pytest.raises(SetupError, match="has 80 categories: set MODEL.FCOS.NUM_CLASSES 80"):
        check_num_classes(cfg)

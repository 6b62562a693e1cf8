"""Setup checks of transfer configs: empty weights need M2.RANDOM_INIT, and the class count the
meta-architecture really reads must match the training dataset (no model is built)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import m2_detectron2  # noqa: F401  (stand-in first)
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2_data import write_detection_set
from m2_detectron2.checks import SetupError, check_num_classes, check_weights_fit
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


# ---------------------------------------------------------------------------------------------
# Weights against the model they load into (checks.check_weights_fit)

DEMO = str(CONFIGS / "demo_shapes_mask_rcnn_R18.yaml")
R50 = str(CONFIGS / "mask_rcnn_R50_FPN_1x.yaml")
TIMM_CFG = str(CONFIGS / "mask_rcnn_timm_FPN_1x.yaml")


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A timm ResNet-18 encoder (.pth without sidecar, as `m2-pretrain export` writes it) and
    its Detectron2 conversion."""
    import timm
    import torch

    from m2_detectron2.convert import convert_file

    root = tmp_path_factory.mktemp("r18")
    enc = root / "encoder.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), enc)
    convert_file(enc, root / "r18.pkl")
    return enc, root / "r18.pkl"


def _cfg(three_categories, config=DEMO, *opts, eval_only=False):
    base = three_categories + ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.FCOS.NUM_CLASSES", "3"]
    return build_config(config, base + list(opts), eval_only=eval_only)


def _fit_error(cfg, **kw) -> str:
    with pytest.raises(SetupError) as e:
        check_weights_fit(cfg, **kw)
    return _one_line(e)


def test_weights_must_fit_the_backbone(three_categories, r18, tmp_path):
    import torch

    from m2_detectron2.safe_load import dumps_pickle, load_pickle

    enc, pkl = r18
    check_weights_fit(_cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(pkl)))  # fits
    n = sum(k.endswith(("weight", "bias", "running_mean", "running_var"))
            for k in load_pickle(pkl)["model"])  # every converted tensor is a backbone tensor
    # an exported encoder without its sidecar: timm names, nothing would load
    msg = _fit_error(_cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(enc)))
    assert msg.startswith(f"MODEL.WEIGHTS={enc}: 0 of the backbone's {n} tensors match")
    assert "convert it first with `python tools/convert_to_d2.py" in msg
    st = enc.with_suffix(".safetensors")  # the same encoder as `export --out X.safetensors`
    from safetensors.torch import save_file

    save_file(torch.load(enc, weights_only=True), st, metadata={"m2_teacher": "{}"})
    msg = _fit_error(_cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(st)))
    assert f"0 of the backbone's {n} tensors match" in msg and "convert it first" in msg
    # the same file with a timm backbone belongs in MODEL.TIMM.WEIGHTS
    msg = _fit_error(_cfg(three_categories, TIMM_CFG, "MODEL.WEIGHTS", str(enc),
                          "MODEL.TIMM.ARCH", "resnet18"))
    assert "pass it as MODEL.TIMM.WEIGHTS" in msg
    # ResNet-18 weights in a ResNet-50 config: a part would load (the stem)
    msg = _fit_error(_cfg(three_categories, R50, "MODEL.WEIGHTS", str(pkl)))
    assert re.match(r"MODEL.WEIGHTS=.*r18.pkl: [1-9]\d* of the backbone's \d+ tensors match", msg)
    assert "ResNet-18 weights but the config builds ResNet-50" in msg
    # one tensor missing: still refused, and how many matched is exact
    payload = load_pickle(pkl)
    del payload["model"]["res5.1.conv2.weight"]
    partial = tmp_path / "partial.pkl"
    partial.write_bytes(dumps_pickle(payload))
    cfg = _cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(partial))
    msg = _fit_error(cfg)
    assert f"{n - 1} of the backbone's {n} tensors match the file; the model's " in msg
    assert msg.endswith("backbone.bottom_up.res5.1.conv2.weight is not in it (another "
                        "architecture?)")
    cfg = _cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(partial), "M2.RANDOM_INIT", "True")
    check_weights_fit(cfg)  # accepted with a warning
    # a pretraining checkpoint (ckpt_*.pth of `m2-pretrain train`)
    ckpt = tmp_path / "ckpt_00000002.pth"
    torch.save({"student": {}, "teacher": {}, "config": {}, "step": 2}, ckpt)
    msg = _fit_error(_cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(ckpt)))
    assert "is a pretraining checkpoint: export and convert it first" in msg
    # a directory
    with pytest.raises(SetupError) as e:
        _cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(tmp_path))
    assert _one_line(e).startswith(f"MODEL.WEIGHTS={tmp_path} is a directory")


def test_eval_only_and_resume_need_the_whole_model(three_categories, r18, tmp_path):
    import torch
    from detectron2.modeling import build_model

    _, pkl = r18
    msg = _fit_error(_cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(pkl), eval_only=True),
                     eval_only=True)
    assert re.search(r"\d+ of the model's \d+ tensors match the file; it holds backbone "
                     r"weights only; --eval-only needs a trained detector", msg)
    cfg = _cfg(three_categories, DEMO, "M2.RANDOM_INIT", "True")
    final = tmp_path / "model_final.pth"
    torch.save({"model": build_model(cfg).state_dict(), "iteration": 9}, final)
    cfg = _cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(final), eval_only=True)
    check_weights_fit(cfg, eval_only=True)
    # a detector trained for another number of classes
    cfg.defrost()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 4
    msg = _fit_error(cfg, eval_only=True)
    assert "of the model's" in msg and "NUM_CLASSES" in msg
    # --resume checks the checkpoint named in OUTPUT_DIR/last_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000099.pth")
    cfg = _cfg(three_categories, DEMO, "MODEL.WEIGHTS", str(pkl), "OUTPUT_DIR", str(out))
    msg = _fit_error(cfg, resume=True)
    assert "model_0000099.pth, which does not exist" in msg
    (out / "model_0000099.pth").write_bytes(pkl.read_bytes())
    (out / "last_checkpoint").write_text("model_0000099.pth")
    import shutil

    shutil.move(out / "model_0000099.pth", out / "model_0000099.pkl")
    (out / "last_checkpoint").write_text("model_0000099.pkl")  # backbone weights only
    msg = _fit_error(cfg, resume=True)
    assert msg.startswith(f"the checkpoint to resume {out / 'model_0000099.pkl'}: 100 of the "
                          "model's 166 tensors match the file; it holds backbone weights only")
    shutil.copy(final, out / "model_0000099.pth")
    (out / "last_checkpoint").write_text("model_0000099.pth")
    check_weights_fit(cfg, resume=True)


def test_timm_weights_are_checked_before_launch(three_categories, r18, tmp_path):
    import json

    import torch

    enc, pkl = r18
    cfg = _cfg(three_categories, TIMM_CFG, "MODEL.TIMM.WEIGHTS", str(enc),
               "MODEL.TIMM.ARCH", "resnet18")
    check_weights_fit(cfg)
    cfg = _cfg(three_categories, TIMM_CFG, "MODEL.TIMM.WEIGHTS", str(enc))  # resnet50
    msg = _fit_error(cfg)
    assert msg.startswith(f"MODEL.TIMM.WEIGHTS={enc}: ") and "missing from the file" in msg
    from safetensors.torch import save_file

    st = tmp_path / "encoder.safetensors"  # `m2-pretrain export` metadata names the arch
    save_file(torch.load(enc, weights_only=True), st,
              metadata={"m2_teacher": json.dumps({"arch": "resnet18"})})
    msg = _fit_error(_cfg(three_categories, TIMM_CFG, "MODEL.TIMM.WEIGHTS", str(st)))
    assert msg == (f"MODEL.TIMM.WEIGHTS={st}: it is a resnet18 encoder (its metadata) and "
                   "MODEL.TIMM.ARCH is resnet50: set MODEL.TIMM.ARCH resnet18")
    check_weights_fit(_cfg(three_categories, TIMM_CFG, "MODEL.TIMM.WEIGHTS", str(st),
                           "MODEL.TIMM.ARCH", "resnet18"))
    cfg = _cfg(three_categories, TIMM_CFG, "MODEL.TIMM.WEIGHTS", str(pkl))
    msg = _fit_error(cfg)
    assert msg.startswith("MODEL.TIMM.WEIGHTS: ") and "already a Detectron2 weights file" in msg
    with pytest.raises(SetupError) as e:
        _cfg(three_categories, TIMM_CFG, "MODEL.TIMM.WEIGHTS", str(tmp_path))
    assert "is a directory" in _one_line(e)


# ---------------------------------------------------------------------------------------------
# Class counts and files of the datasets the run uses

TEN = "m2checks_10cat"


@pytest.fixture(scope="module")
def ten_categories(tmp_path_factory):
    if f"{TEN}_val" not in DatasetCatalog.list():
        root = tmp_path_factory.mktemp("d2checks10")
        for split in ("train", "val"):
            ann, img_root = write_detection_set(root, split, 1, [1, 2], num_categories=10)
            register_coco_spec(f"{TEN}_{split}={ann}:{img_root}")
    return f"{TEN}_train", f"{TEN}_val"


def test_class_count_reads_the_datasets_the_run_uses(ten_categories, three_categories):
    train10, val10 = ten_categories
    fcos = str(CONFIGS / "fcos_R50_FPN_1x.yaml")
    ten = ["M2.RANDOM_INIT", "True", "MODEL.FCOS.NUM_CLASSES", "10"]
    # --eval-only reads DATASETS.TEST only: TRAIN left at COCO (80) does not matter
    cfg = build_config(fcos, ten + ["DATASETS.TEST", f"('{val10}',)"], eval_only=True)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    with pytest.raises(SetupError) as e:  # an 80-class model on the 10-class test set
        build_config(fcos, ["M2.RANDOM_INIT", "True", "DATASETS.TEST", f"('{val10}',)"],
                     eval_only=True)
    assert _one_line(e) == (f"MODEL.FCOS.NUM_CLASSES is 80 but test dataset {val10} has 10 "
                            "categories: set MODEL.FCOS.NUM_CLASSES 10")
    # training reads TRAIN and, for its final evaluation, TEST
    build_config(fcos, ten + ["DATASETS.TRAIN", f"('{train10}',)", "DATASETS.TEST",
                              f"('{val10}',)"])
    with pytest.raises(SetupError) as e:
        build_config(fcos, ten + ["DATASETS.TRAIN", f"('{train10}',)"])  # TEST: COCO val
    assert _one_line(e).startswith("MODEL.FCOS.NUM_CLASSES is 10 but test dataset "
                                   "coco_2017_val has 80 categories, and training ends with an "
                                   "evaluation on DATASETS.TEST")
    with pytest.raises(SetupError, match=f"training dataset {NAME} has 3"):
        build_config(fcos, ten + ["DATASETS.TRAIN", f"('{NAME}',)", "DATASETS.TEST",
                                  f"('{val10}',)"])


def test_test_set_files_are_checked_before_training(ten_categories, tmp_path, monkeypatch):
    """COCO under $DETECTRON2_DATASETS is registered lazily: a missing test set would fail
    only at the final evaluation."""
    from m2_detectron2.checks import check_dataset_files

    train10, val10 = ten_categories
    fcos = str(CONFIGS / "fcos_R50_FPN_1x.yaml")
    cfg = build_config(fcos, ["M2.RANDOM_INIT", "True", "DATASETS.TRAIN", f"('{train10}',)",
                              "DATASETS.TEST", "()", "MODEL.FCOS.NUM_CLASSES", "10"])
    cfg.DATASETS.TEST = ("coco_2017_val",)
    with pytest.raises(SetupError) as e:
        check_dataset_files(cfg)
    assert re.match(r"test dataset coco_2017_val: annotation file \S+instances_val2017.json "
                    r"does not exist", _one_line(e))
    cfg.defrost()
    cfg.DATASETS.TEST = (val10,)
    check_dataset_files(cfg)
    cfg.DATASETS.TRAIN = ("coco_2017_train",)
    check_dataset_files(cfg, eval_only=True)  # --eval-only does not read DATASETS.TRAIN
    with pytest.raises(SetupError, match="training dataset coco_2017_train: annotation file"):
        check_dataset_files(cfg)


# ---------------------------------------------------------------------------------------------
# --register-coco files are validated on registration

def _coco(tmp_path, mutate=None, text=None):
    import json

    ann, img_root = write_detection_set(tmp_path, "set", 2, [1, 2])
    if text is not None:
        ann.write_text(text)
    elif mutate is not None:
        data = json.loads(ann.read_text())
        mutate(data)
        ann.write_text(json.dumps(data))
    return ann, img_root


_BROKEN = {
    "not valid JSON": (None, '{"images": ['),
    "has no 'images' list": (lambda d: d.pop("images"), None),
    "has no 'categories' list": (lambda d: d.pop("categories"), None),
    "has no 'annotations' list": (lambda d: d.pop("annotations"), None),
    r"annotations\[1\] \(id 2\) has no valid 'bbox'": (
        lambda d: d["annotations"][1].pop("bbox"), None),
    r"annotations\[0\] \(id 1\) names category_id 9": (
        lambda d: d["annotations"][0].update(category_id=9), None),
    r"annotations\[0\] \(id 1\) names image_id 77": (
        lambda d: d["annotations"][0].update(image_id=77), None),
    r"images\[0\] needs id, file_name, height and width": (
        lambda d: d["images"][0].pop("height"), None),
    "1 of 2 image files are missing under .*, e.g. gone.png": (
        lambda d: d["images"][1].update(file_name="gone.png"), None),
    # every box outside its image: nothing left to train on after the mapper
    r"has no annotation to learn from \(6 annotations: 0 iscrowd, 6 with a box outside": (
        lambda d: [a.update(bbox=[500.0, 400.0, 10.0, 10.0]) for a in d["annotations"]], None),
    r"has no annotation to learn from \(6 annotations: 6 iscrowd, 0 with": (
        lambda d: [a.update(iscrowd=1) for a in d["annotations"]], None),
    r"has no annotation to learn from \(0 annotations": (
        lambda d: d["annotations"].clear(), None),
    r"images\[1\] repeats image id 1; Detectron2 would merge the two images": (
        lambda d: [d["images"][1].update(id=1)]
        + [a.update(image_id=1) for a in d["annotations"] if a["image_id"] == 2], None),
    r"annotations\[1\] \(id 1\) repeats annotation id 1": (
        lambda d: d["annotations"][1].update(id=1), None),
    r"images\[0\]: file_name '../set/000000.png' points outside the image folder": (
        lambda d: d["images"][0].update(file_name="../set/000000.png"), None),
    r"images\[0\] 000000.png is 128x96 \(width x height, after its EXIF rotation\) but the json "
    r"says 128x50: fix its width/height": (lambda d: d["images"][0].update(height=50), None),
}


@pytest.mark.parametrize("expected", list(_BROKEN))
def test_broken_coco_files_are_refused_on_registration(expected, tmp_path):
    from m2_detectron2.data import DatasetSpecError

    mutate, text = _BROKEN[expected]
    ann, img_root = _coco(tmp_path, mutate, text)
    name = f"m2broken_{abs(hash(expected))}"
    with pytest.raises(DatasetSpecError) as e:
        register_coco_spec(f"{name}={ann}:{img_root}")
    assert re.match(f"dataset '{name}': {re.escape(str(ann))}:? .*{expected}", _one_line(e))
    assert name not in DatasetCatalog.list()


def test_masks_are_required_for_mask_models_only(tmp_path):
    from m2_detectron2.data import DatasetSpecError

    ann, img_root = _coco(tmp_path, lambda d: d["annotations"][2].pop("segmentation"))
    with pytest.raises(DatasetSpecError, match=r"annotations\[2\] \(id 3\) has no "
                                               r"'segmentation', which a mask model"):
        build_config(str(CONFIGS / "demo_shapes_mask_rcnn_R18.yaml"),
                     ["M2.RANDOM_INIT", "True"], register_coco=[f"m2nomask_a={ann}:{img_root}"])
    # RetinaNet reads boxes only
    register_coco_spec(f"m2nomask_b={ann}:{img_root}", need_masks=False)
    assert MetadataCatalog.get("m2nomask_b").thing_classes == ["cat1", "cat2"]


def test_rle_masks_need_the_bitmask_format(tmp_path):
    from m2_detectron2.data import DatasetSpecError

    rle = {"size": [96, 128], "counts": "PPYo0"}  # compressed RLE, as COCO's crowd regions
    ann, img_root = _coco(tmp_path, lambda d: d["annotations"][4].update(segmentation=rle))
    with pytest.raises(DatasetSpecError, match=r"annotations\[4\] \(id 5\) has an RLE "
                                               r"'segmentation', which INPUT.MASK_FORMAT 'polygon' "
                                               r"cannot read: set INPUT.MASK_FORMAT bitmask"):
        build_config(str(CONFIGS / "demo_shapes_mask_rcnn_R18.yaml"),
                     ["M2.RANDOM_INIT", "True", "INPUT.MASK_FORMAT", "polygon"],
                     register_coco=[f"m2rle_a={ann}:{img_root}"])
    assert "m2rle_a" not in DatasetCatalog.list()
    register_coco_spec(f"m2rle_b={ann}:{img_root}", need_masks=True, mask_format="bitmask")
    # a crowd region in RLE is dropped by Detectron2 whatever the format
    ann2, root2 = _coco(tmp_path / "crowd", lambda d: d["annotations"][4].update(
        segmentation=rle, iscrowd=1))
    register_coco_spec(f"m2rle_c={ann2}:{root2}", need_masks=True, mask_format="polygon")


def test_exif_rotation_and_non_regular_files_are_checked(tmp_path):
    import json
    import os

    from PIL import Image

    from m2_detectron2.data import DatasetSpecError

    ann, img_root = _coco(tmp_path)
    data = json.loads(ann.read_text())
    img = Image.open(img_root / "000000.png").convert("RGB")  # 128 x 96
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: Detectron2 reads it as 96 x 128
    img.save(img_root / "rot.jpg", exif=exif.tobytes())
    data["images"][0]["file_name"] = "rot.jpg"
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetSpecError, match=r"images\[0\] rot.jpg is 96x128 \(width x "
                                               r"height, after its EXIF rotation\) but the json "
                                               r"says 128x96"):
        register_coco_spec(f"m2exif_a={ann}:{img_root}")
    data["images"][0].update(width=96, height=128)
    ann.write_text(json.dumps(data))
    register_coco_spec(f"m2exif_b={ann}:{img_root}")
    # a FIFO named like an image is refused before any loader opens (and blocks on) it
    os.mkfifo(img_root / "fifo.png")
    data["images"][1]["file_name"] = "fifo.png"
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetSpecError, match=r"images\[1\]: \S+fifo.png is not a regular file"):
        register_coco_spec(f"m2exif_c={ann}:{img_root}")


def test_size_check_samples_large_sets_evenly(tmp_path, monkeypatch):
    from m2_detectron2 import data as d2data

    opened = []
    monkeypatch.setattr(d2data, "SIZE_CHECK_SAMPLE", 5)
    monkeypatch.setattr(d2data, "_oriented_size", lambda p: opened.append(p.name) or (128, 96))
    images = [{"id": i, "file_name": f"{i}.png", "width": 128, "height": 96} for i in range(101)]
    d2data._check_sizes("x", tmp_path, images)
    assert opened == ["0.png", "25.png", "50.png", "75.png", "100.png"]


def test_lvis_name_given_a_coco_file_is_refused_before_training(tmp_path):
    from detectron2.data.datasets import register_lvis_instances

    from m2_detectron2.checks import check_dataset_files

    coco, root = write_detection_set(tmp_path / "coco", "val", 1, [1, 2])
    lvis, lroot = write_detection_set(tmp_path / "lvis", "val", 1, [1, 2], lvis=True)
    register_lvis_instances("m2lvis_coco_file", {}, str(coco), str(root))
    register_lvis_instances("m2lvis_lvis_file", {}, str(lvis), str(lroot))
    cfg = build_config(str(CONFIGS / "mask_rcnn_R50_FPN_2x_lvis_v0.5.yaml"),
                       ["M2.RANDOM_INIT", "True", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    cfg.DATASETS.TEST = ("m2lvis_coco_file",)
    with pytest.raises(SetupError, match=r"test dataset m2lvis_coco_file is registered as LVIS "
                                         r"but \S+val.json has no LVIS fields"):
        check_dataset_files(cfg)
    cfg.DATASETS.TEST = ("m2lvis_lvis_file",)
    check_dataset_files(cfg)

"""Detectron2 plugin: every shipped config trains 2 iterations and evaluates on generated
COCO/LVIS-format data; converted and timm weights are really loaded; FCOS, the timm backbone,
dataset registration, the LVIS numpy shim and train_net's errors."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import m2_detectron2  # noqa: F401  (stand-in first)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_lvis_instances
from detectron2.modeling import build_model

from d2_data import write_detection_set
from m2_detectron2.convert import ConversionError, convert_file
from m2_detectron2.data import DatasetSpecError, register_coco_spec
from m2_detectron2.train import SetupError, Trainer, build_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "detectron2"
PAPER_CONFIGS = sorted(p.name for p in CONFIGS.glob("[a-z]*.yaml"))
COCO_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}
LVIS_KEYS = COCO_KEYS | {"APr", "APc", "APf"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2data")
    names = {}
    for split, n in (("train", 4), ("val", 2)):
        ann, img_root = write_detection_set(root / "coco", split, n, [1, 2, 3], seed=len(split),
                                            num_categories=80)
        name = f"m2test_coco_{split}"
        if name not in DatasetCatalog.list():
            register_coco_spec(f"{name}={ann}:{img_root}")
        names[f"coco_{split}"] = name
        # LVIS v0.5 category ids (1..1230); the builtin LVIS v0.5 metadata applies by name.
        ann, img_root = write_detection_set(root / "lvis", split, n, [3, 700, 1230], lvis=True,
                                            seed=len(split))
        name = f"m2test_lvis_v0.5_{split}"
        if name not in DatasetCatalog.list():
            register_lvis_instances(name, {}, str(ann), str(img_root) + "/")
        names[f"lvis_{split}"] = name
        names[f"lvis_{split}_json"] = ann
    return names


def _resnet(arch):
    m = timm.create_model(arch, pretrained=False, num_classes=0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random R50/R18 state_dicts (timm names) and their Detectron2 conversions."""
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for arch in ("resnet50", "resnet18"):
        torch.save(_resnet(arch).state_dict(), root / f"{arch}.pth")
        convert_file(root / f"{arch}.pth", root / f"{arch}.pkl")
        out[arch] = (root / f"{arch}.pth", root / f"{arch}.pkl")
    return out


def _small(data, weights, config, out_dir):
    lvis = "lvis" in config
    d = "lvis" if lvis else "coco"
    opts = [
        "DATASETS.TRAIN", f"('{data[d + '_train']}',)", "DATASETS.TEST", f"('{data[d + '_val']}',)",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out_dir),
        "TEST.PRECISE_BN.NUM_ITER", "2",  # the configs recompute BN statistics (200 batches)
        # low thresholds so that the untrained models emit detections for the evaluator
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        "MODEL.FCOS.SCORE_THRESH_TEST", "0.0",
    ]
    if "timm" in config:
        opts += ["MODEL.TIMM.WEIGHTS", str(weights["resnet50"][0])]
    elif "R18" in config:  # the demo config (10 classes) on the generated 80-category set
        opts += ["MODEL.WEIGHTS", str(weights["resnet18"][1]), "MODEL.ROI_HEADS.NUM_CLASSES", "80"]
    else:
        opts += ["MODEL.WEIGHTS", str(weights["resnet50"][1])]
    return build_config(str(CONFIGS / config), opts)


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_config_trains_and_evaluates(config, data, weights, tmp_path):
    cfg = _small(data, weights, config, tmp_path / "out")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER == 2
    from detectron2.engine.hooks import PreciseBN

    assert cfg.TEST.PRECISE_BN.ENABLED == ("demo" not in config)  # SyncBN paper configs
    assert any(isinstance(h, PreciseBN) for h in trainer._hooks) == cfg.TEST.PRECISE_BN.ENABLED
    assert math.isfinite(trainer.storage.history("total_loss").latest())
    results = trainer._last_eval_results
    tasks = {"bbox", "segm"} if cfg.MODEL.MASK_ON else {"bbox"}
    assert set(results) == tasks
    expected = LVIS_KEYS if "lvis" in config else COCO_KEYS
    for task in tasks:
        assert expected <= set(results[task]), (task, sorted(results[task]))
        # NaN (COCO) or -100 (LVIS) mark metrics without ground truth of that kind
        assert all(math.isnan(v) or v == -100.0 or 0.0 <= v <= 100.0
                   for v in results[task].values()), results[task]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    shutil.rmtree(tmp_path / "out")  # R50 checkpoints are large


def _bottom_up_equal_to(model, d2_pkl):
    import pickle

    with open(d2_pkl, "rb") as f:
        src = pickle.load(f)["model"]
    own = {k: v for k, v in model.backbone.bottom_up.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert set(own) == set(src)
    bad = [k for k in own if not torch.equal(own[k], torch.from_numpy(src[k]))]
    assert not bad, bad[:5]


def test_converted_weights_are_loaded(data, weights, tmp_path, caplog):
    cfg = _small(data, weights, "mask_rcnn_R50_FPN_1x.yaml", tmp_path)
    model = build_model(cfg)
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    not_found = [r.getMessage() for r in caplog.records if "not found" in r.getMessage()]
    assert not any("bottom_up" in m for m in not_found), not_found
    _bottom_up_equal_to(model, weights["resnet50"][1])
    # torchvision-style ResNet: stride in the 3x3 conv, as the config says
    assert model.backbone.bottom_up.res3[0].conv2.stride == (2, 2)
    assert model.backbone.bottom_up.res3[0].conv1.stride == (1, 1)


def test_timm_backbone_loads_exported_encoder_and_matches_timm(data, weights, tmp_path):
    cfg = _small(data, weights, "mask_rcnn_timm_FPN_1x.yaml", tmp_path)
    model = build_model(cfg).eval()
    ref = timm.create_model("resnet50", pretrained=False, features_only=True,
                            out_indices=(1, 2, 3, 4)).eval()
    ref.load_state_dict(torch.load(weights["resnet50"][0]), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        theirs = ref(x)
    assert list(ours) == ["res2", "res3", "res4", "res5"]
    for a, b in zip(ours.values(), theirs):
        torch.testing.assert_close(a, b)
    shapes = model.backbone.bottom_up.output_shape()
    assert [shapes[k].stride for k in ours] == [4, 8, 16, 32]
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.backbone.bottom_up.modules())


def test_timm_backbone_beyond_resnet_and_errors(tmp_path):
    from m2_detectron2.modeling import TimmBackbone

    arch = "mobilenetv3_small_050"
    bb = TimmBackbone(arch, ["res3", "res4", "res5"], norm="BN", freeze_at=2)
    info = timm.create_model(arch, features_only=True).feature_info
    shapes = bb.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        f"res{int(math.log2(r))}": (c, r) for c, r in zip(info.channels(), info.reduction())
        if r >= 8}
    out = bb(torch.randn(2, 3, 64, 64))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(8, 8), (4, 4), (2, 2)]
    frozen = [n for n, p in bb.named_parameters() if not p.requires_grad]
    # freeze_at=2: the stem (level 1, ends at bn1) and the first block stage (level 2)
    assert [d["module"] for d in info.get_dicts()[:2]] == ["bn1", "blocks.0"]
    assert frozen and all(n.startswith(("body.conv_stem", "body.blocks.0.")) for n in frozen)
    assert any(n.startswith("body.blocks.0.") for n in frozen)
    assert all(p.requires_grad for n, p in bb.named_parameters() if n.startswith("body.blocks.1."))
    frozen_bn = [m for m in bb.body.blocks[0].modules() if "Frozen" in type(m).__name__]
    assert frozen_bn and "Frozen" in type(bb.body.bn1).__name__
    assert not any("Frozen" in type(m).__name__ for m in bb.body.blocks[1].modules())
    with pytest.raises(ValueError, match="no feature level"):
        TimmBackbone(arch, ["res6"])
    with pytest.raises(ValueError, match="MODEL.TIMM.NORM"):
        TimmBackbone(arch, ["res5"], norm="GN")
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConversionError, match="missing from the file"):
        TimmBackbone(arch, ["res5"], weights=str(tmp_path / "r18.pth"))


def test_fcos_head_uses_group_norm(data, weights, tmp_path):
    cfg = _small(data, weights, "fcos_R50_FPN_1x.yaml", tmp_path)
    model = build_model(cfg)
    gns = [m for m in model.head.cls_subnet if isinstance(m, torch.nn.GroupNorm)]
    assert len(gns) == 4 and all(g.num_groups == 32 for g in gns)
    assert model.head_in_features == ["p3", "p4", "p5", "p6", "p7"]
    assert type(model).__name__ == "M2FCOS" and cfg.INPUT.FORMAT == "RGB"
    # the paper's baseline is AdelaiDet's FCOS: learnable per-level scales, cls > 0.05
    assert model.variant == "adelaidet" and tuple(model.head.scales.shape) == (5,)
    assert build_config(str(CONFIGS / "fcos_R50_FPN_1x.yaml"), ["M2.RANDOM_INIT", "True"]
                        ).INPUT.MIN_SIZE_TRAIN == (800,)


def test_lvis_numpy_shim(data, monkeypatch):
    """lvis 0.5.3 uses np.float; with numpy >= 1.24 semantics (simulated here by making the
    attribute lookup fail) plain LVISEval breaks and the plugin's shim makes it work."""
    import json

    from lvis import LVIS, LVISEval, LVISResults

    from m2_detectron2.evaluation import lvis_numpy_compat

    ann = data["lvis_val_json"]
    gt = json.load(open(ann))["annotations"]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 0.9} for a in gt]
    orig = np.__getattr__ if hasattr(np, "__getattr__") else None

    def strict(name):
        if name == "float":
            raise AttributeError("module 'numpy' has no attribute 'float'")
        if orig is None:
            raise AttributeError(name)
        return orig(name)

    monkeypatch.setattr(np, "__getattr__", strict, raising=False)
    assert "float" not in np.__dict__

    def run():
        lvis_gt = LVIS(str(ann))
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, dets), "bbox")
        ev.run()
        return ev.get_results()

    with pytest.raises(AttributeError, match="float"):
        run()
    with lvis_numpy_compat():
        res = run()
    assert "float" not in np.__dict__  # removed again
    assert res["AP"] == pytest.approx(1.0)  # detections equal to the ground truth


def test_register_coco_spec_errors(tmp_path):
    with pytest.raises(DatasetSpecError, match="must look like"):
        register_coco_spec("nonsense")
    with pytest.raises(DatasetSpecError, match="annotation file"):
        register_coco_spec(f"x={tmp_path / 'missing.json'}:{tmp_path}")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(DatasetSpecError, match="image directory"):
        register_coco_spec(f"x={tmp_path / 'a.json'}:{tmp_path / 'nope'}")


def test_build_config_errors(data, weights, tmp_path):
    cfg_file = str(CONFIGS / "mask_rcnn_R50_FPN_1x.yaml")
    with pytest.raises(SetupError, match="unknown dataset.*no_such_set"):
        build_config(cfg_file, ["DATASETS.TRAIN", "('no_such_set',)"])
    with pytest.raises(SetupError, match="does not exist"):
        build_config(cfg_file, ["MODEL.WEIGHTS", str(tmp_path / "missing.pkl"),
                                "DATASETS.TEST", "()", "DATASETS.TRAIN", f"('{data['coco_train']}',)"])
    enc = tmp_path / "encoder.pth"
    shutil.copy(weights["resnet50"][0], enc)
    from m2_pretrain.export import meta_path

    meta_path(enc).write_text("{}")  # the metadata sidecar `m2-pretrain export` writes
    with pytest.raises(SetupError, match="exported encoder.*convert_to_d2"):
        build_config(cfg_file, ["MODEL.WEIGHTS", str(enc), "DATASETS.TEST", "()",
                                "DATASETS.TRAIN", f"('{data['coco_train']}',)"])


def test_train_net_cli_reports_setup_errors(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
                        str(CONFIGS / "retinanet_R50_FPN_1x.yaml"), "DATASETS.TRAIN",
                        "('missing_set',)", "OUTPUT_DIR", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "error: unknown dataset(s) ['missing_set']" in r.stderr
    assert "Traceback" not in r.stderr


def test_embedded_coco_annotations(tmp_path):
    import json

    import pycocotools.mask as mask_util
    from detectron2.data.datasets import load_coco_json

    from m2_detectron2.data import render_mosaic, write_embedded_coco

    ann_file = write_embedded_coco(tmp_path, "val", 3, seed=5)
    d = json.load(open(ann_file))
    assert len(d["images"]) == 3 and len(d["annotations"]) == 12 and len(d["categories"]) == 10
    img, inst = render_mosaic(1, seed=5)
    anns = [a for a in d["annotations"] if a["image_id"] == 2]
    for a, (cat, mask) in zip(anns, inst):
        assert a["category_id"] == cat
        assert np.array_equal(mask_util.decode(a["segmentation"]).astype(bool), mask)
        ys, xs = np.where(mask)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == mask.sum()
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "val" / "val_000001.png")), img)
    dicts = load_coco_json(str(ann_file), str(tmp_path / "val"))
    assert len(dicts) == 3 and all(len(r["annotations"]) == 4 for r in dicts)
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


def test_train_net_main_trains_then_eval_only_writes_results(data, weights, tmp_path):
    """The plugin-shaped entry point: train (2 iterations), then --eval-only on the result."""
    import json

    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    from m2_detectron2.train import main

    out = tmp_path / "out"
    common = ["DATASETS.TRAIN", f"('{data['coco_train']}',)", "DATASETS.TEST",
              f"('{data['coco_val']}',)", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST",
              "96", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
              "DATALOADER.NUM_WORKERS", "0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
              "TEST.PRECISE_BN.NUM_ITER", "2",
              "OUTPUT_DIR", str(out)]
    cfg_file = str(CONFIGS / "retinanet_R50_FPN_1x.yaml")
    res = main(train_net.parse_args(["--config-file", cfg_file, "MODEL.WEIGHTS",
                                     str(weights["resnet50"][1])] + common))
    assert COCO_KEYS <= set(res["bbox"])
    saved = json.load(open(out / "results.json"))
    assert saved["results"]["bbox"]["AP"] == pytest.approx(res["bbox"]["AP"], nan_ok=True)
    assert (out / "config.yaml").is_file() and (out / "model_final.pth").is_file()
    res2 = main(train_net.parse_args(["--config-file", cfg_file, "--eval-only", "MODEL.WEIGHTS",
                                      str(out / "model_final.pth")] + common))
    assert res2["bbox"]["AP"] == pytest.approx(res["bbox"]["AP"], nan_ok=True)


def test_demo_into_an_output_dir_with_a_run_says_what_to_do(tmp_path):
    """A second `make demo` into the same folder stops before touching it, naming the ways on."""
    from m2_detectron2 import demo

    ckpt = tmp_path / "pretrain" / "ckpt_00000010.pth"
    ckpt.parent.mkdir()
    torch.save({}, ckpt)
    with pytest.raises(SystemExit) as e:
        demo.main(["--output-dir", str(tmp_path)])
    msg = str(e.value)
    assert msg.startswith("error: ") and "already holds a run" in msg
    assert "make demo DEMO_OUT=" in msg and "--reuse-pretraining" in msg
    # nothing written but the run lock: no results, no export, the checkpoint untouched
    assert sorted(p.name for p in tmp_path.rglob("*") if not p.name.startswith(".")) == [
        "ckpt_00000010.pth", "pretrain"]
    assert torch.load(ckpt) == {}

"""timm/torchvision ResNet -> Detectron2 converter."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from m2_detectron2.convert import ConversionError, convert_file, convert_state_dict, verify

REPO = Path(__file__).resolve().parents[1]


def _resnet(arch="resnet18", num_classes=0):
    m = timm.create_model(arch, num_classes=num_classes, pretrained=False)
    with torch.no_grad():  # non-trivial BN statistics so that eval-mode BN matters in --verify
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m


def test_key_set_is_exact():
    sd = _resnet("resnet50", num_classes=1000).state_dict()
    d2, dropped = convert_state_dict(sd)
    assert "fc.weight" in dropped and "fc.bias" in dropped
    assert all(k == "fc.weight" or k == "fc.bias" or k.endswith("num_batches_tracked") for k in dropped)
    assert len(d2) + len(dropped) == len(sd)
    assert "stem.conv1.weight" in d2 and "stem.conv1.norm.running_var" in d2
    assert "res2.0.shortcut.weight" in d2 and "res2.0.shortcut.norm.bias" in d2
    assert "res5.2.conv3.norm.weight" in d2 and not any(k.startswith(("layer", "fc", "bn1")) for k in d2)
    assert sum(k.startswith("res4.") and k.endswith("conv1.weight") for k in d2) == 6


def test_unmapped_keys_are_listed():
    sd = _resnet().state_dict()
    sd["projector.0.weight"] = torch.zeros(3)
    sd["layer1.0.bn1.alpha"] = torch.tensor(0.5)
    with pytest.raises(ConversionError, match="2 keys cannot be converted.*projector.0.weight.*layer1.0.bn1.alpha|2 keys cannot be converted.*layer1.0.bn1.alpha.*projector"):
        convert_state_dict(sd)


def test_verify_and_pickle_format(tmp_path):
    src = tmp_path / "r18.pth"
    torch.save(_resnet().state_dict(), src)
    info = convert_file(src, tmp_path / "r18.pkl")
    assert info["depth"] == 18
    with open(tmp_path / "r18.pkl", "rb") as f:
        payload = pickle.load(f)
    assert payload["matching_heuristics"] is True and payload["__author__"]
    assert set(payload) == {"model", "__author__", "matching_heuristics"}
    assert verify(src, tmp_path / "r18.pkl", res=64) < 1e-4
    # a wrong conversion is caught: swap two BN statistics and verification fails
    payload["model"]["res3.0.conv1.norm.running_var"] = payload["model"]["res3.0.conv1.norm.running_var"] * 4
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(payload, f)
    assert verify(src, tmp_path / "bad.pkl", res=64) > 1e-3


def test_training_checkpoint_and_cli(tmp_path):
    from m2_pretrain.engine.checkpoint import list_checkpoints
    from m2_pretrain.engine.trainer import Trainer

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import tiny_config

    cfg = tiny_config(train={"max_steps": 1})
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    r = subprocess.run([sys.executable, "tools/convert_to_d2.py", str(ckpt), str(tmp_path / "t.pkl"),
                        "--verify"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ResNet-18" in r.stdout and "max abs diff" in r.stdout
    diff = float(r.stdout.split("max abs diff")[1].split()[0])
    assert diff < 1e-3
    with open(tmp_path / "t.pkl", "rb") as f:
        keys = set(pickle.load(f)["model"])
    assert not any("alpha" in k or "projector" in k or "predictor" in k for k in keys)
    bad = tmp_path / "x.pth"
    torch.save({"projector.weight": torch.zeros(2)}, bad)
    r = subprocess.run([sys.executable, "tools/convert_to_d2.py", str(bad), str(tmp_path / "x.pkl")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "cannot be converted" in r.stderr and "Traceback" not in r.stderr

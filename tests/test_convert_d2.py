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
    assert set(payload) == {"model", "__author__", "matching_heuristics", "m2_teacher"}
    assert payload["m2_teacher"] == {"source": str(src.resolve()), "depth": 18}
    assert verify(src, tmp_path / "r18.pkl", res=64) < 1e-4
    # a wrong conversion is caught: swap two BN statistics and verification fails
    payload["model"]["res3.0.conv1.norm.running_var"] = payload["model"]["res3.0.conv1.norm.running_var"] * 4
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(payload, f)
    assert verify(src, tmp_path / "bad.pkl", res=64) > 1e-3


def test_training_checkpoint_and_cli(tmp_path):
    from m2_pretrain.checkpoint import list_checkpoints
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


# ---------------------------------------------------------------------------------------------
# Output safety and .safetensors input

@pytest.fixture(scope="module")
def r18_encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv_out")
    src = root / "encoder.pth"
    torch.save(_resnet().state_dict(), src)
    return src


def _cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """tools/convert_to_d2.py in this process: (exit code, stdout, stderr)."""
    sys.path.insert(0, str(REPO / "tools"))
    import convert_to_d2

    monkeypatch.setattr(sys, "argv", ["convert_to_d2.py", *map(str, argv)])
    code = convert_to_d2.main()
    out, err = capsys.readouterr()
    return code, out, err


def test_converter_never_overwrites_without_force(r18_encoder, tmp_path, monkeypatch,
                                                  capsys):
    from m2_detectron2 import convert

    out = tmp_path / "out.pkl"
    out.write_bytes(b"earlier result")
    with pytest.raises(ConversionError, match="out.pkl already exists; .*pass --force"):
        convert_file(r18_encoder, out)
    assert out.read_bytes() == b"earlier result"
    # a training checkpoint, the input itself, a .pth, a directory: refused even with --force
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "ckpt_00000002.pth"
    ckpt.write_bytes(b"136 MB of training state")
    cases = {ckpt: "named like a training checkpoint", r18_encoder: "is the input file itself",
             tmp_path / "weights.pth": "must end in .pkl", run: "is a directory"}
    for target, expected in cases.items():
        with pytest.raises(ConversionError, match=expected):
            convert_file(r18_encoder, target, overwrite=True)
    assert ckpt.read_bytes() == b"136 MB of training state"
    assert not (tmp_path / "weights.pth").exists()
    # an interrupted write leaves the earlier file and no temporary file
    def interrupted(payload, f):
        f.write(b"half a pickle")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "dump_pickle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_file(r18_encoder, out, overwrite=True)
    assert out.read_bytes() == b"earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pkl", "run"]
    monkeypatch.undo()
    convert_file(r18_encoder, out, overwrite=True)  # --force replaces it
    with open(out, "rb") as f:
        assert pickle.load(f)["model"]["stem.conv1.weight"].shape == (64, 3, 7, 7)
    # the command line: one-line errors, exit 2
    for argv, expected in (((r18_encoder, out), "already exists"),
                           ((r18_encoder, ckpt, "--force"), "training checkpoint"),
                           ((r18_encoder, run), "is a directory")):
        code, _, err = _cli(monkeypatch, capsys, *argv)
        assert code == 2 and err.startswith("error: ") and expected in err
        assert err.count("\n") == 1, err
    code, stdout, err = _cli(monkeypatch, capsys, r18_encoder, out, "--force")
    assert code == 0 and "ResNet-18" in stdout, err


def test_safetensors_encoder_converts_and_loads_into_the_timm_backbone(r18_encoder, tmp_path):
    import json

    from safetensors.torch import save_file

    from m2_detectron2.modeling.timm_backbone import load_timm_weights
    from m2_pretrain.export import load_exported_encoder

    sd = torch.load(r18_encoder, weights_only=True)
    meta = {"arch": "resnet18", "which": "teacher", "step": 7}
    st = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, st,
              metadata={"m2_teacher": json.dumps(meta)})
    got, got_meta = load_exported_encoder(st)
    assert got_meta == meta and all(torch.equal(got[k], v) for k, v in sd.items())
    convert_file(st, tmp_path / "st.pkl")
    convert_file(r18_encoder, tmp_path / "pth.pkl")
    with open(tmp_path / "st.pkl", "rb") as f, open(tmp_path / "pth.pkl", "rb") as g:
        a, b = pickle.load(f)["model"], pickle.load(g)["model"]
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    body = timm.create_model("resnet18", pretrained=False, features_only=True)
    load_timm_weights(body, str(st))
    own = body.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in own if not k.endswith("num_batches_tracked"))
    with pytest.raises(ConversionError, match="--which only applies to training checkpoints"):
        convert_file(st, tmp_path / "x.pkl", which="student")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    from m2_pretrain.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="bad.safetensors is not a readable safetensors"):
        convert_file(bad, tmp_path / "y.pkl")

"""`m2-pretrain export`: timm's safetensors format with the metadata in its header, no file
replaced without --force (the .json sidecar included), no unsafe advice, no broken encoder
exported or evaluated."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open

from m2_pretrain import cli
from m2_pretrain.checkpoint import CheckpointError, safe_load
from m2_pretrain.engine.trainer import Trainer
from m2_pretrain.eval.common import EvalInputError, load_encoder
from m2_pretrain.export import META_KEY, export_encoder, load_exported_encoder, meta_path

from helpers import tiny_config


def _cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ex:
        cli.main(argv)
    return ex.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training checkpoint at step 0 (ResNet-18 teacher) and the trainer that wrote it."""
    run = tmp_path_factory.mktemp("run")
    t = Trainer(tiny_config(), run, progress=False)
    path = t.save_checkpoint()
    t._run_lock.release()
    return path, t


def test_default_export_is_safetensors_that_timm_loads_with_its_metadata(checkpoint, tmp_path,
                                                                         monkeypatch, capsys):
    ckpt, trainer = checkpoint
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["export", str(ckpt)], capsys)  # no --out: the documented default
    out = tmp_path / "encoder.safetensors"
    assert code == 0, err
    assert out.is_file() and not meta_path(out).exists()  # no sidecar to lose
    model = timm.create_model("resnet18", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out)))
    teacher = trainer.model.teacher.encoder.state_dict()
    got = model.state_dict()
    assert set(got) == {k for k in teacher if not k.endswith(".alpha")}
    for k, v in got.items():
        torch.testing.assert_close(v, teacher[k], rtol=0, atol=0)
    with safe_open(str(out), framework="pt") as f:
        header = json.loads(f.metadata()[META_KEY])
    assert header["arch"] == "resnet18" and header["which"] == "teacher" and header["step"] == 0
    sd, meta = load_exported_encoder(out)
    assert meta == header and set(sd) == set(got)
    # the evaluation protocols read the same file without --arch
    encoder, emeta = load_encoder(out)
    assert emeta["arch"] == "resnet18" and emeta["mean"] == trainer.cfg.data.mean


def test_export_replaces_neither_weights_nor_sidecar_without_force(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out = tmp_path / "enc.pth"
    meta_path(out).write_text("precious")
    code, err = _cli(["export", str(ckpt), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "enc.pth.json already exists" in err
    assert meta_path(out).read_text() == "precious" and not out.exists()
    st = tmp_path / "enc.safetensors"
    st.write_bytes(b"precious")
    code, err = _cli(["export", str(ckpt), "--out", str(st)], capsys)
    assert code == 2 and "--force" in err and st.read_bytes() == b"precious"
    # --force replaces both, through temporary files renamed into place (none left behind)
    assert _cli(["export", str(ckpt), "--out", str(out), "--force"], capsys)[0] == 0
    assert json.loads(meta_path(out).read_text())["arch"] == "resnet18"
    assert "conv1.weight" in safe_load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.pth", "enc.pth.json",
                                                         "enc.safetensors"]
    # a run directory's checkpoint names belong to the trainer
    code, err = _cli(["export", str(ckpt), "--out", str(tmp_path / "ckpt_00000099.pth")], capsys)
    assert code == 2 and "named like a training checkpoint" in err
    assert not (tmp_path / "ckpt_00000099.pth").exists()


def test_truncated_sidecar_is_one_line(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out = tmp_path / "enc.pth"
    export_encoder(ckpt, out)
    meta_path(out).write_text('{"arch": "resn')
    with pytest.raises(CheckpointError, match=r"enc.pth.json: the encoder metadata is not valid"):
        load_exported_encoder(out)
    code, err = _cli(["knn", "--weights", str(out), "--no-progress", "train.device=cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not valid JSON" in err


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this-must-not-run",))


def test_refusals_never_advise_loading_unsafely(tmp_path, capsys):
    files = {}
    for proto in (1, 2):
        files[f"p{proto}"] = tmp_path / f"p{proto}.pth"
        files[f"p{proto}"].write_bytes(pickle.dumps({"a": _RunsCode()}, protocol=proto))
    files["zip"] = tmp_path / "zip.pth"
    torch.save({"a": _RunsCode()}, files["zip"])
    files["numpy"] = tmp_path / "numpy.pth"
    torch.save({"a": np.array([1, 2], dtype=object)}, files["numpy"])
    for name, path in files.items():
        with pytest.raises(CheckpointError) as e:
            safe_load(path)
        text = str(e.value)
        assert "\n" not in text and "not a loadable PyTorch checkpoint" in text, name
        for advice in ("weights_only=False", "set to `False`", "safe_globals", "trust"):
            assert advice not in text, (name, text)
        code, err = _cli(["export", str(path), "--out", str(tmp_path / f"{name}.safetensors")],
                         capsys)
        assert code == 2 and err.count("\n") == 1 and "False" not in err, (name, err)
    with pytest.raises(CheckpointError, match="GLOBAL posix.system"):  # the reason is kept
        safe_load(files["p2"])


def test_non_finite_weights_are_refused_by_export_and_evaluation(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    broken = safe_load(ckpt)
    broken["teacher"]["encoder.layer1.0.bn1.running_var"][3] = float("inf")
    bad = tmp_path / "broken.pt"
    torch.save(broken, bad)
    code, err = _cli(["export", str(bad), "--out", str(tmp_path / "e.safetensors")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "teacher tensor layer1.0.bn1.running_var holds NaN or inf" in err
    assert not (tmp_path / "e.safetensors").exists()
    # an encoder file with a NaN weight (written by hand): knn, linear and semi load it the same way
    sd = {k: v.clone() for k, v in load_exported_encoder(_export(ckpt, tmp_path))[0].items()}
    sd["fc.weight" if "fc.weight" in sd else "conv1.weight"].view(-1)[0] = float("nan")
    nan_file = tmp_path / "nan.pth"
    torch.save(sd, nan_file)
    meta_path(nan_file).write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(EvalInputError, match="tensor conv1.weight holds NaN or inf"):
        load_encoder(nan_file)
    out = tmp_path / "knn_out"
    code, err = _cli(["knn", "--weights", str(nan_file), "--output-dir", str(out), "--no-progress",
                      "train.device=cpu", "data.num_images=16"], capsys)
    assert code == 2 and "conv1.weight holds NaN" in err and not out.exists()


def _export(ckpt: Path, folder: Path) -> Path:
    out = folder / "good.safetensors"
    export_encoder(ckpt, out)
    return out

"""Evaluation and pretraining inputs that used to give a silent wrong result, replace a file,
hang or end in a traceback: one class mapping for every split, split files by relative path,
results.json never replaced without --force, 16-bit images scaled, FIFOs refused, the
converter's checks, and the pretraining inputs of the third round of bad-input trials."""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from m2_pretrain import cli
from m2_pretrain.checkpoint import (
    CHECKPOINT_FORMAT, CHECKPOINT_MARKER, CheckpointError, atomic_save, atomic_write)
from m2_pretrain.config import ConfigError, load_config
from m2_pretrain.data.datasets import DatasetError, ImageFolderDataset, read_idx
from m2_pretrain.engine.run_dir import RunDirError, find_resume_checkpoint
from m2_pretrain.eval.common import EvalInputError, load_encoder, read_split_file
from m2_pretrain.export import META_KEY, check_output_file

ARCH = "resnet10t"
COLOURS = {"a": (230, 20, 20), "b": (20, 230, 20), "c": (20, 20, 230), "d": (230, 230, 20)}


def _cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ex:
        cli.main(argv)
    out = capsys.readouterr()
    return ex.value.code, out.out, out.err


def _folder(root: Path, classes: str, per_class: int, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: solid colour per class plus a little noise."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.array(COLOURS[c], np.int16) + rng.integers(-8, 9, (32, 32, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "enc.pth"
    torch.save(timm.create_model(ARCH, num_classes=0).state_dict(), path)
    Path(str(path) + ".json").write_text(json.dumps({"arch": ARCH}))
    return path


def _knn_argv(weights, root: Path, out: Path, *extra) -> list[str]:
    return ["knn", "--weights", str(weights), "--output-dir", str(out), "--no-progress",
            "data.dataset=imagefolder", f"data.root={root}", "data.knn_train_split=train",
            "data.knn_test_split=val", "data.res=32", "data.workers=0", "train.device=cpu",
            "knn.k=3", "eval.batch_size=16", *extra]


# ------------------------------------------------------------------------------ class mapping
def test_knn_numbers_every_split_by_the_training_split_classes(encoder_file, tmp_path, capsys):
    root = tmp_path / "data"
    _folder(root / "train", "abc", 4)
    _folder(root / "val", "ac", 2, seed=1)  # class b has no validation images
    code, out, err = _cli(_knn_argv(encoder_file, root, tmp_path / "knn"), capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "knn" / "results.json").read_text())["results"]
    assert res["top1"] == 100.0  # split-by-split numbering gave 50.00
    assert res["num_classes"] == 3 and res["classes_missing_from_val"] == ["b"]
    # a validation class the training split lacks cannot be predicted: one line, no result
    _folder(root / "val", "d", 2)
    code, _, err = _cli(_knn_argv(encoder_file, root, tmp_path / "knn2"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{root / 'val'} has class folder(s) ['d'] that the training split" in err
    assert not (tmp_path / "knn2").exists()


def test_linear_probe_uses_the_same_mapping(encoder_file, tmp_path):
    from m2_pretrain.eval.protocols import linear_probe

    root = tmp_path / "data"
    _folder(root / "train", "abc", 4)
    _folder(root / "val", "bc", 2, seed=1)
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}",
                             "data.knn_train_split=train", "eval.val_split=val", "data.res=32",
                             "data.workers=0", "eval.batch_size=12", "eval.linear_epochs=40",
                             "eval.linear_augment=false", "eval.linear_lr=2.0"])
    encoder, _ = load_encoder(encoder_file)
    torch.manual_seed(0)
    res = linear_probe(encoder, cfg, torch.device("cpu"), progress=False)
    assert res["num_classes"] == 3 and res["classes_missing_from_val"] == ["a"]
    assert res["top1"] == 100.0


# ------------------------------------------------------------------------------ split files
def test_split_files_name_images_by_relative_path(tmp_path):
    root = tmp_path / "train"
    _folder(root, "ab", 8)  # a/0.png ... a/7.png and b/0.png ... b/7.png
    ds = ImageFolderDataset(root)
    split = tmp_path / "split.txt"
    split.write_text("".join(f"a/{i}.png\n" for i in range(8)))
    idx = read_split_file(split, ds)
    assert [ds.targets[i] for i in idx] == [0] * 8  # matching by file name took b/ (last wins)
    assert [ds.image_relpath(i) for i in idx] == [f"a/{i}.png" for i in range(8)]
    # a longer path ending in the relative one, and an unambiguous bare name, still match
    split.write_text(f"{tmp_path}/train/b/3.png\ntrain/a/5.png\n")
    assert [ds.image_relpath(i) for i in read_split_file(split, ds)] == ["b/3.png", "a/5.png"]
    # a bare file name that names two images is refused, not guessed
    split.write_text("0.png\n")
    with pytest.raises(EvalInputError, match=r"'0.png' names 2 images \(a/0.png, b/0.png\)"):
        read_split_file(split, ds)


# ------------------------------------------------------------------------------ results.json
def test_evaluation_refuses_an_existing_result_without_force(encoder_file, tmp_path, capsys):
    root = tmp_path / "data"
    _folder(root / "train", "ab", 3)
    _folder(root / "val", "ab", 1, seed=1)
    out = tmp_path / "knn"
    out.mkdir()
    (out / "results.json").write_text("precious")
    code, _, err = _cli(_knn_argv(encoder_file, root, out), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "results.json already exists" in err and "--force" in err
    assert (out / "results.json").read_text() == "precious"
    code, _, err = _cli(_knn_argv(encoder_file, root, out, "--force"), capsys)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["protocol"] == "knn"


# ------------------------------------------------------------------------------ decoding
def _ramp16(path: Path) -> np.ndarray:
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(path)
    return ramp


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    ramp = _ramp16(tmp_path / "train" / "a" / "ramp.png")
    assert Image.open(tmp_path / "train" / "a" / "ramp.png").mode in ("I;16", "I")
    img, _ = ImageFolderDataset(tmp_path / "train")[0]
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (64, 64, 3)
    want = np.round(ramp * 255.0 / 65535.0)
    assert np.abs(arr[..., 0].astype(float) - want).max() == 0
    assert (arr == 255).mean() < 0.01  # clipping made 99.6 % of the ramp white
    # a float image has no known range: refused in one line
    from m2_pretrain.data.image_file import ImageFileError, load_rgb8

    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageFileError, match=r"f.tif: floating-point image \(mode F\)"):
        load_rgb8(tmp_path / "f.tif")


def _in_thread(fn, timeout=10.0):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the read blocked"
    return box


def test_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    os.mkfifo(tmp_path / "a" / "stuck.png")
    with pytest.raises(DatasetError, match=r"stuck.png is named like an image but is not a "
                                           r"regular file"):
        ImageFolderDataset(tmp_path)
    from m2_pretrain.data.image_file import ImageFileError, load_rgb8

    box = _in_thread(lambda: load_rgb8(tmp_path / "a" / "stuck.png"))
    assert isinstance(box.get("error"), ImageFileError)
    assert "is a FIFO, not an image file" in str(box["error"])


def test_truncated_gz_dataset_file_is_one_line(tmp_path):
    data = bytes([0, 0, 8, 1]) + (1000).to_bytes(4, "big") + bytes(1000)
    gz = gzip.compress(data)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz: cannot decompress .*"
                                           r"truncated or corrupt"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte")


# ------------------------------------------------------------------------------ export / convert
def test_export_to_a_folder_name_with_a_slash_is_refused(tmp_path):
    src = tmp_path / "ckpt.pth"
    src.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"names a directory; name a file in it"):
        check_output_file(src, f"{tmp_path}/dir/")
    assert not (tmp_path / "dir").exists()


def test_converter_applies_exports_checks(tmp_path):
    from m2_detectron2.convert import ConversionError, convert_file
    from m2_detectron2.safe_load import load_pickle

    sd = timm.create_model("resnet18", num_classes=0).state_dict()
    sd["layer2.0.bn1.running_var"][3] = float("nan")
    src = tmp_path / "nan.pth"
    torch.save(sd, src)
    with pytest.raises(ConversionError, match=r"layer2.0.bn1.running_var holds NaN or inf"):
        convert_file(src, tmp_path / "nan.pkl")
    assert not (tmp_path / "nan.pkl").exists()
    # metadata: checked against the weights, and carried into the .pkl
    sd["layer2.0.bn1.running_var"][3] = 1.0
    good = tmp_path / "enc.pth"
    torch.save(sd, good)
    Path(str(good) + ".json").write_text(json.dumps({"arch": "resnet50", "step": 7}))
    with pytest.raises(ConversionError, match=r"metadata says resnet50 but the weights are a "
                                              r"ResNet-18"):
        convert_file(good, tmp_path / "enc.pkl")
    Path(str(good) + ".json").write_text(json.dumps({"arch": "resnet18", "step": 7}))
    convert_file(good, tmp_path / "enc.pkl")
    meta = load_pickle(tmp_path / "enc.pkl")["m2_teacher"]
    assert meta["arch"] == "resnet18" and meta["step"] == 7 and meta["depth"] == 18
    with pytest.raises(ConversionError, match="already exists.*--force"):
        convert_file(good, tmp_path / "enc.pkl")
    with pytest.raises(ConversionError, match="names a directory"):
        convert_file(good, f"{tmp_path}/out/")


# ------------------------------------------------------------------------------ pretraining inputs
def _ckpt(folder: Path, step: int, **parts) -> Path:
    from helpers import tiny_config

    state = {CHECKPOINT_MARKER: CHECKPOINT_FORMAT, "student": {}, "teacher": {},
             "config": tiny_config().to_dict(), "optimizer": {"state": {}, "param_groups": []},
             "step": step, "rng": {}}
    state.update(parts)
    for k in [k for k, v in state.items() if v is None]:
        del state[k]
    path = folder / f"ckpt_{step:08d}.pth"
    atomic_save(state, path)
    return path


def test_resume_refuses_newer_formats_and_incomplete_checkpoints(tmp_path, caplog):
    _ckpt(tmp_path, 10)
    newer = _ckpt(tmp_path, 20, **{CHECKPOINT_MARKER: CHECKPOINT_FORMAT + 1})
    with pytest.raises(RunDirError, match=rf"{newer.name} was written by a newer m2-pretrain "
                                          rf"\(checkpoint format {CHECKPOINT_FORMAT + 1}"):
        find_resume_checkpoint(tmp_path)
    newer.unlink()
    no_state = _ckpt(tmp_path, 30, optimizer=None, rng=None)
    path, _ = find_resume_checkpoint(tmp_path)  # skips it, naming what it lacks
    assert path.name == "ckpt_00000010.pth"
    assert f"skipping {no_state}: it lacks optimizer, rng" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("train:\n  seed: 1\ndata:\n  res: 32\ntrain:\n  epochs: 3\n",
     r"line 5: invalid YAML: key 'train' is written twice \(lines 1 and 5\)"),
    ("train:\n  seed: !!python/object/apply:os.system ['touch {marker}']\n",
     r"line 2: invalid YAML: could not determine a constructor .* a config may hold only plain"),
])
def test_yaml_configs_refuse_duplicates_and_python_tags(tmp_path, text, message):
    marker = tmp_path / "PWNED"
    path = tmp_path / "c.yaml"
    path.write_text(text.format(marker=marker))
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert not marker.exists()


@pytest.mark.parametrize("override, message", [
    ("train.epochs=inf", "'train.epochs' must be a finite number, got inf"),
    ("optim.base_lr=.nan", "'optim.base_lr' must be a finite number, got nan"),
    ("train.seed=99999999999999999999", r"'train.seed' must be in \[0, 2\*\*32\)"),
])
def test_non_finite_and_out_of_range_numbers_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


class _Statvfs:
    f_bavail, f_frsize = 100, 4096  # 0.4 MiB left


@pytest.mark.parametrize("failure", ["enospc", "torch_writer"])
def test_full_disk_is_named_and_leaves_the_old_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "ckpt_00000001.pth"
    path.write_bytes(b"old")

    def no_space(f):
        f.write(b"partial")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        # what torch.save raises on a full disk: no errno, no word of space
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    if failure == "torch_writer":
        monkeypatch.setattr(os, "statvfs", lambda p: _Statvfs())
    with pytest.raises(CheckpointError, match=rf"cannot write {path}: the disk holding "
                                              rf"{tmp_path} is full"):
        atomic_write(path, no_space)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        path.name]


# ------------------------------------------------------------------------------ metadata / eval
def test_encoder_metadata_and_weights_urls(encoder_file, tmp_path, capsys):
    from safetensors.torch import save_file

    sd = torch.load(encoder_file, weights_only=True)
    st = tmp_path / "noarch.safetensors"
    save_file(sd, str(st), metadata={META_KEY: json.dumps({"step": 3})})
    with pytest.raises(EvalInputError, match=rf"the metadata in its header key '{META_KEY}' has "
                                             r"no 'arch': pass the architecture \(--arch\)"):
        load_encoder(st)
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))
    with pytest.raises(EvalInputError, match="has no metadata"):
        load_encoder(bare)
    # file:// weights, and a config naming another architecture: the weights' is evaluated
    # and recorded
    root = tmp_path / "data"
    _folder(root / "train", "ab", 3)
    _folder(root / "val", "ab", 1, seed=1)
    argv = _knn_argv(f"file://{encoder_file}", root, tmp_path / "knn", "model.arch=resnet50")
    code, _, err = _cli(argv, capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert res["config"]["model"]["arch"] == ARCH and res["encoder_meta"]["arch"] == ARCH
    assert res["weights"] == str(encoder_file.resolve()) and math.isfinite(res["results"]["top1"])

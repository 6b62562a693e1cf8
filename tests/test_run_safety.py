"""Pretraining is safe and loss-free by default: output-directory ownership and lock, resume
config checks, export that never replaces its input, stale temporary files, divergence of
weights and statistics with a finite loss, and one-line errors."""

from __future__ import annotations

import fcntl
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2_pretrain import cli
from m2_pretrain.config import ConfigError, load_config
from m2_pretrain.checkpoint import (
    CheckpointError, atomic_save, list_checkpoints, safe_load)
from m2_pretrain.engine.run_dir import (
    LOCK_NAME, RESUME_CHANGEABLE_KEYS, ResumeConfigError, RunDirError)
from m2_pretrain.engine.trainer import DivergedStateError, Trainer
from m2_pretrain.eval.common import EvalInputError, load_encoder
from m2_pretrain.export import export_encoder

from helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ex:
        cli.main(argv)
    return ex.value.code, capsys.readouterr().err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != LOCK_NAME}


def test_fresh_run_refuses_a_directory_holding_another_run(tmp_path):
    run = tmp_path / "run"
    t = Trainer(tiny_config(), run, progress=False)
    t.save_checkpoint()  # another run's checkpoint and config.yaml
    del t
    before = _snapshot(run)
    cfg = tiny_config(optim={"base_lr": 0.2})
    with pytest.raises(RunDirError, match=r"already holds a run \(1 checkpoint.*--resume"):
        Trainer(cfg, run, progress=False)
    assert _snapshot(run) == before  # nothing deleted, config.yaml not overwritten
    # only unreadable checkpoints: --resume refuses instead of starting over (and rotating)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt_00000004.pth").write_bytes(b"truncated")
    with pytest.raises(RunDirError, match="none of the 1 checkpoint.*loads"):
        Trainer(tiny_config(), bad, resume=True, progress=False)
    assert (bad / "ckpt_00000004.pth").read_bytes() == b"truncated"


def test_second_process_is_locked_out_until_the_first_dies(tmp_path):
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        from m2_pretrain.engine.run_dir import claim_output_dir
        lock = claim_output_dir({str(run)!r}, resume=False)
        print("locked", flush=True)
        time.sleep(120)
    """)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"another run \\(pid {proc.pid} on .*\\) is writing"):
            Trainer(tiny_config(), run, resume=True, progress=False)
    finally:
        proc.kill()  # kill -9: the OS drops the lock, so the run can be resumed
        proc.wait()
    t = Trainer(tiny_config(), run, resume=True, progress=False)
    # the lock is really held now: another open file description cannot take it
    fd = os.open(run / LOCK_NAME, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    t._run_lock.release()


def test_resume_refuses_config_changes_outside_the_allowlist(tmp_path, caplog):
    run = tmp_path / "run"
    t = Trainer(tiny_config(), run, progress=False)
    t.save_checkpoint()
    del t
    saved_yaml = (run / "config.yaml").read_text()
    for changed in ({"train": {"batch_size": 4}}, {"optim": {"base_lr": 0.5}}):
        with pytest.raises(ResumeConfigError, match="differs from the checkpoint.*--resume-allow"):
            Trainer(tiny_config(**changed), run, resume=True, progress=False)
    assert (run / "config.yaml").read_text() == saved_yaml
    # the architecture can never change, not even with the override
    with pytest.raises(ResumeConfigError,
                       match="model config differs.*model.arch: 'resnet18' -> 'resnet10t'"):
        Trainer(tiny_config(model={"arch": "resnet10t"}), run, resume=True, progress=False,
                allow_config_changes=True)
    # documented changeable keys pass (and are logged)
    assert {"train.max_steps", "data.workers", "train.log_every"} <= set(RESUME_CHANGEABLE_KEYS)
    with caplog.at_level("WARNING"):
        t = Trainer(tiny_config(train={"max_steps": 9, "log_every": 3}), run, resume=True,
                    progress=False)
    assert t.total_steps == 9 and "train.max_steps changed from 6 to 9" in caplog.text
    t._run_lock.release()
    # the explicit override accepts other changes and logs them
    caplog.clear()
    with caplog.at_level("WARNING"):
        t = Trainer(tiny_config(optim={"base_lr": 0.5}), run, resume=True, progress=False,
                    allow_config_changes=True)
    assert "optim.base_lr changed from 0.1 to 0.5" in caplog.text
    t._run_lock.release()


def test_stale_temporary_checkpoint_is_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run / f".ckpt_00000002.pth.tmp.{dead.pid}"
    stale.write_bytes(b"x" * 1000)
    alive = run / f".ckpt_00000002.pth.tmp.{os.getppid()}"  # a live process's save: kept
    alive.write_bytes(b"y")
    t = Trainer(tiny_config(), run, resume=True, progress=False)
    assert not stale.exists() and alive.exists()
    t._run_lock.release()


def test_export_never_replaces_its_input_or_an_existing_file(tmp_path, capsys):
    t = Trainer(tiny_config(), tmp_path, progress=False)
    ckpt = t.save_checkpoint()
    before = ckpt.read_bytes()
    code, err = _cli(["export", str(ckpt), "--out", str(ckpt)], capsys)
    assert code == 2 and "is the input file itself" in err and ckpt.read_bytes() == before
    assert err.count("\n") == 1
    other = tmp_path / "ckpt_00000009.pth"
    atomic_save({"step": 9}, other)
    with pytest.raises(CheckpointError, match="is named like a training checkpoint"):
        export_encoder(ckpt, other, overwrite=True)
    out = tmp_path / "enc.pth"
    out.write_bytes(b"precious")
    code, err = _cli(["export", str(ckpt), "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert out.read_bytes() == b"precious"
    code, _ = _cli(["export", str(ckpt), "--out", str(out), "--force"], capsys)
    assert code == 0 and "conv1.weight" in safe_load(out)


def test_diverging_weights_stop_the_run_although_the_loss_is_finite(tmp_path):
    # the reproduction: the loss stays bounded while weights and BN variances blow up
    cfg = tiny_config(optim={"base_lr": 1e6, "warmup_epochs": 0},
                      train={"max_steps": 4}, checkpoint={"every_steps": 1})
    t = Trainer(cfg, tmp_path, progress=False)
    with pytest.raises(DivergedStateError, match="by step 1, the parameter norm diverged.*No "
                                                 "checkpoint was written"):
        t.fit()
    assert all(math.isfinite(r["loss"]) for r in t.history)  # the loss alone never told
    for p in list_checkpoints(tmp_path):  # every checkpoint left behind is sound
        ck = safe_load(p)
        for part in ("student", "teacher"):
            assert all(torch.isfinite(v).all() and v.norm() < 1e12
                       for v in ck[part].values() if v.is_floating_point()), (p.name, part)


def _corrupt_image_folder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    (root / "a" / "0.png").write_bytes(b"not a png")
    return root


def test_user_errors_are_one_line(tmp_path, capsys):
    common = ["train.device=cpu", "data.res=32", "train.max_steps=2"]

    def train(out, *overrides, resume=False):
        return _cli(["train", "--no-progress", "--output-dir", str(out)]
                    + (["--resume"] if resume else []) + common + list(overrides), capsys)

    code, err = train(tmp_path / "o", "model.arch=not_a_model")
    assert code == 2 and err == ("error: config key 'model.arch' names no timm model: "
                                 "'not_a_model' (see timm.list_models())\n")
    code, err = train(tmp_path / "o", "data.num_images=20", "train.batch_size=32", "data.workers=0")
    assert code == 2 and err.count("\n") == 1 and ("'train.batch_size' (32 per process x 1 "
                                                   "processes) is larger than the dataset (20 "
                                                   "images)") in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = train(a_file)
    assert code == 2 and "is a file, not a directory" in err and err.count("\n") == 1
    # a corrupt image read in a DataLoader worker: the original message, not the worker's traceback
    _corrupt_image_folder(tmp_path / "imgs" / "train")
    code, err = train(tmp_path / "c", "data.dataset=imagefolder", f"data.root={tmp_path / 'imgs'}",
                      "data.workers=1", "train.batch_size=8", "model.arch=resnet10t")
    assert code == 2 and err.startswith("error: cannot read image") and "0.png" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # kNN with an unknown architecture
    w = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, w)
    code, err = _cli(["knn", "--weights", str(w), "--arch", "not_a_model"], capsys)
    assert code == 2 and "unknown timm architecture 'not_a_model'" in err and err.count("\n") == 1
    # resume with a changed architecture
    run = tmp_path / "r"
    Trainer(tiny_config(), run, progress=False).save_checkpoint()
    code, err = train(run, "model.arch=resnet10t", "data.num_images=64", resume=True)
    assert code == 2 and "model config differs" in err and err.count("\n") == 1


def test_detectron2_pickle_and_random_file_are_named_without_unsafe_advice(tmp_path):
    # the Detectron2 keys come after the weights: beyond the first MiB of a real file
    pkl = tmp_path / "model.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"res2.0.conv1.weight": np.zeros((1 << 19,), np.float32)},
                     "__author__": "m2", "matching_heuristics": True}, f)
    assert pkl.stat().st_size > 2 << 20
    with pytest.raises(EvalInputError, match="is a Detectron2 weights file"):
        load_encoder(pkl)
    with pytest.raises(CheckpointError, match="already a Detectron2 weights file.*MODEL.WEIGHTS"):
        safe_load(pkl)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as e:
        safe_load(junk)
    assert "not a loadable PyTorch checkpoint" in str(e.value)
    assert "weights_only` set to `False`" not in str(e.value) and "\n" not in str(e.value)


def test_batch_larger_than_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        Trainer(tiny_config(data={"num_images": 4}), tmp_path, progress=False)


# ----------------------------------------------------------------------------- checked up front
@pytest.mark.parametrize("overrides, message", [
    (["model.arch=convnext_atto", "model.zero_init_last=false"],
     "'model.zero_init_last' is not an argument of timm 'convnext_atto'"),
    (["model.arch=vit_tiny_patch16_224"],
     r"'data.res' \(32\) does not fit timm 'vit_tiny_patch16_224': Input height \(32\)"),
    pytest.param(["train.device=cuda"], "'train.device' is cuda but no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")),
])
def test_values_checked_before_the_output_dir_is_touched(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    code, err = _cli(["train", "--no-progress", "--output-dir", str(out), "train.device=cpu",
                      "data.res=32", "train.max_steps=1", *overrides], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A valid PNG whose header claims side x side pixels: beyond PIL's decompression-bomb
    limit, refused when opened (its few bytes are never decoded)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + chunk(b"IEND", b""))


def test_failed_launch_leaves_nothing_that_blocks_the_corrected_one(tmp_path, capsys):
    """A decompression bomb in the first batch stops the run naming the file; the corrected
    command, with overrides written after --no-progress, starts afresh in the same directory."""
    root = _corrupt_image_folder(tmp_path / "imgs" / "train")
    (root / "a" / "0.png").unlink()
    _bomb_png(root / "a" / "0.png")
    out = tmp_path / "run"
    common = ["data.dataset=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.workers=0",
              "train.batch_size=8", "model.arch=resnet10t", "data.res=32", "train.max_steps=1",
              "train.device=cpu", "checkpoint.every_steps=1"]
    code, err = _cli(["train", "--output-dir", str(out), "--no-progress", *common], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "cannot read image" in err and "0.png: DecompressionBombError" in err
    assert not (out / "config.yaml").exists() and not list_checkpoints(out)
    code, err = _cli(["train", "--output-dir", str(out), *common[:3], "--no-progress",
                      *common[3:], "data.skip_corrupt=true"], capsys)
    assert code == 0, err
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000001.pth"]
    # skip_corrupt may be switched on when resuming a run that met a bad image
    t = Trainer(load_config(None, common + ["train.max_steps=2", "data.skip_corrupt=true"]), out,
                resume=True, progress=False)
    assert t.step == 1
    t._run_lock.release()


# ----------------------------------------------------------------------------- resume by content
def test_resume_skips_foreign_and_broken_checkpoints_naming_them(tmp_path, caplog):
    run = tmp_path / "run"
    t = Trainer(tiny_config(), run, progress=False)
    good = t.save_checkpoint()
    t._run_lock.release()
    del t
    ck = safe_load(good)
    nan = dict(ck, teacher=dict(ck["teacher"]))
    nan["teacher"]["encoder.conv1.weight"] = ck["teacher"]["encoder.conv1.weight"] * float("nan")
    atomic_save(nan, run / "ckpt_00000005.pth")
    big = dict(ck, student=dict(ck["student"]))
    w = ck["student"]["encoder.conv1.weight"]
    big["student"]["encoder.conv1.weight"] = w * (7.7e10 / float(w.norm()))
    atomic_save(big, run / "ckpt_00000007.pth")
    atomic_save({"conv1.weight": torch.zeros(2)}, run / "ckpt_00000009.pth")  # an encoder
    with caplog.at_level("WARNING"):
        t = Trainer(tiny_config(), run, resume=True, progress=False)
    assert t._resumed_from == (good, 0)
    t._run_lock.release()
    log = caplog.text
    assert "ckpt_00000009.pth: not a checkpoint written by the trainer" in log
    assert "ckpt_00000007.pth: the parameter norm diverged: 7.7e+10" in log
    assert "ckpt_00000005.pth: teacher.encoder.conv1.weight holds NaN or inf" in log
    # nothing sound left: one line naming what was skipped, not a KeyError
    good.unlink()
    with pytest.raises(RunDirError, match="none of the 3 checkpoint.*ckpt_00000009.pth: not a "
                                          "checkpoint written by the trainer"):
        Trainer(tiny_config(), run, resume=True, progress=False)


# ----------------------------------------------------------------------------- divergence rule
def test_divergence_rule_passes_a_healthy_run_and_stops_a_blown_up_one(tmp_path, monkeypatch):
    small = {"arch": "resnet10t"}
    t = Trainer(tiny_config(model=small, train={"max_steps": 4}), tmp_path / "ok", progress=False)
    assert t.fit()["status"] == "completed"
    _, params, _, buffers = t.guard.named_state()
    with torch.no_grad():
        _, p, b = t.guard.norms(params, buffers)
    ref_p, ref_b = t.guard.reference
    # far inside the limits (1e3 x for the parameters, 1e6 x for the statistics)
    assert 0.5 < float(p) / ref_p < 10 and 0.5 < float(b) / ref_b < 1e3, (p, ref_p, b, ref_b)
    # finite and below the absolute 1e12, but orders of magnitude above the start
    state = dict(list(t.model.named_parameters()) + list(t.model.named_buffers()))
    for name, factor, what in (("teacher.encoder.layer2.0.bn1.running_var", 1e8, "buffer"),
                               ("student.encoder.layer1.0.conv1.weight", 1e5, "parameter")):
        with torch.no_grad():
            state[name].mul_(factor)
        with pytest.raises(DivergedStateError, match=f"by step 4, the {what}.* norm diverged"):
            t._check_finite_state()
        with torch.no_grad():
            state[name].div_(factor)
        t._check_finite_state()
    t._run_lock.release()

    # a run blown up mid-way stops at the next check and names the checkpoint before it
    run = tmp_path / "blown"
    t = Trainer(tiny_config(model=small, train={"max_steps": 3}), run, progress=False)
    weight = t.model.student.encoder.layer1[0].conv1.weight
    orig = t.model.update_teacher

    def update(one_minus_m):
        orig(one_minus_m)
        if t.step == 2:  # the optimizer step that ends at step 3
            with torch.no_grad():
                weight.mul_(1e5)

    monkeypatch.setattr(t.model, "update_teacher", update)
    with pytest.raises(DivergedStateError, match="by step 3, the parameter norm diverged") as e:
        t.fit()
    assert f"The newest checkpoint, {run / 'ckpt_00000002.pth'} (step 2)" in str(e.value)
    assert [c.name for c in list_checkpoints(run)] == ["ckpt_00000002.pth"]
    t._run_lock.release()

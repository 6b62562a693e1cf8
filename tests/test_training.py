"""Trainer: resume equivalence, signal checkpoint, NaN stop, atomic save, export, DDP."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch

from m2_pretrain.checkpoint import atomic_save, list_checkpoints, safe_load
from m2_pretrain.engine.trainer import NonFiniteLossError, Trainer
from m2_pretrain.eval.knn import knn_monitor
from m2_pretrain.export import export_encoder, load_exported_encoder
from m2_pretrain.models import M2Teacher

from helpers import run_torchrun, sigterm_during_step, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _losses(result):
    return [(r["step"], r["loss"]) for r in result["history"]]


def test_resume_after_sigterm_matches_uninterrupted(tmp_path, monkeypatch):
    cfg = tiny_config()
    full = Trainer(cfg, tmp_path / "full", progress=False).fit()
    assert full["status"] == "completed" and len(full["history"]) == 6

    # interrupted run: a real SIGTERM arrives during step 3
    t = Trainer(cfg, tmp_path / "part", progress=False)
    sigterm_during_step(t, monkeypatch, 2)  # the 3rd optimizer step is running
    part = t.fit()
    assert part["status"].startswith("interrupted") and part["step"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["ckpt_00000002.pth", "ckpt_00000003.pth"]

    rest = Trainer(cfg, tmp_path / "part", resume=True, progress=False)
    assert rest.step == 3
    rest_result = rest.fit()
    got = _losses(part) + _losses(rest_result)
    want = _losses(full)
    assert [s for s, _ in got] == [s for s, _ in want]
    torch.testing.assert_close(torch.tensor([l for _, l in got]), torch.tensor([l for _, l in want]),
                               rtol=0, atol=0)
    a = safe_load(list_checkpoints(tmp_path / "full")[-1])
    b = safe_load(list_checkpoints(tmp_path / "part")[-1])
    for k in a["teacher"]:
        torch.testing.assert_close(a["teacher"][k], b["teacher"][k], rtol=0, atol=0)
    assert (tmp_path / "full" / "config.yaml").is_file()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(train={"max_steps": 8})
    calls = {"n": 0}
    orig = M2Teacher.forward

    def forward(self, v1, v2):
        out = orig(self, v1, v2)
        calls["n"] += 1
        if calls["n"] == 6:  # step index 5
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(M2Teacher, "forward", forward)
    t = Trainer(cfg, tmp_path, progress=False)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 5") as e:
        t.fit()
    # the message names the checkpoint to go back to, and more than the learning rate
    last = tmp_path / "ckpt_00000004.pth"
    assert f"The newest checkpoint, {last} (step 4), passed these checks" in str(e.value)
    assert "corrupt input data" in str(e.value) and "last good" not in str(e.value)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names[-1] == "ckpt_00000004.pth"
    ck = safe_load(tmp_path / names[-1])
    assert all(torch.isfinite(v).all() for v in ck["student"].values() if v.is_floating_point())
    t._run_lock.release()
    # a resumed run that breaks before its next checkpoint names the one it started from
    calls["n"] = 5
    t = Trainer(cfg, tmp_path, resume=True, progress=False)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 4") as e:
        t.fit()
    assert (f"No checkpoint holds the broken state: this run resumed from {last} (step 4)"
            in str(e.value))


def test_atomic_save_survives_kill(tmp_path):
    target = tmp_path / "ckpt_00000001.pth"
    atomic_save({"step": 1, "w": torch.arange(5.0)}, target)
    script = textwrap.dedent(f"""
        import time, torch
        from m2_pretrain import checkpoint as C
        def slow_save(obj, f):
            f.write(b"partial-bytes" * 1000); f.flush()
            time.sleep(120)
        C.torch.save = slow_save
        C.atomic_save({{"step": 2, "w": torch.zeros(5)}}, {str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(".tmp." + str(proc.pid)) for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert any(".tmp." in p.name for p in tmp_path.iterdir()), "the save never started"
    ck = safe_load(target)
    assert ck["step"] == 1
    torch.testing.assert_close(ck["w"], torch.arange(5.0))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000001.pth"]


def test_export_loads_strictly_into_timm(tmp_path):
    cfg = tiny_config(train={"max_steps": 2})
    t = Trainer(cfg, tmp_path, progress=False)
    t.fit()
    ckpt = list_checkpoints(tmp_path)[-1]
    meta = export_encoder(ckpt, tmp_path / "enc.pth")
    assert meta["arch"] == "resnet18" and meta["which"] == "teacher" and meta["step"] == 2
    assert meta["mean"] == cfg.data.mean
    sd, meta2 = load_exported_encoder(tmp_path / "enc.pth")
    assert meta2 == meta
    model = timm.create_model("resnet18", num_classes=0, pretrained=False)
    model.load_state_dict(sd, strict=True)
    # the exported encoder computes what the teacher encoder computes in eval mode
    model.eval()
    teacher = t.model.teacher.encoder.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), teacher(x), atol=1e-5, rtol=1e-5)
    student_sd = safe_load(ckpt)["student"]
    s_meta = export_encoder(ckpt, tmp_path / "student.pth", which="student")
    assert s_meta["which"] == "student"
    torch.testing.assert_close(safe_load(tmp_path / "student.pth")["conv1.weight"],
                               student_sd["encoder.conv1.weight"])


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "m2_pretrain.cli", "export", str(bad), "--out",
                        str(tmp_path / "o.pth")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "not a loadable PyTorch checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "m2_pretrain.cli", "train", "train.batchsize=3"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unknown config key 'train.batchsize'" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model_overrides", [
    {},
    {"method": "mocov2", "arch": "resnet10t", "moco_dim": 16, "moco_hidden": 32, "moco_queue": 64,
     "key_norm": "shuffle_bn"},
], ids=["m2", "mocov2_shuffle_bn"])
def test_ddp_two_processes_same_teacher(tmp_path, model_overrides):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from helpers import tiny_config
        from m2_pretrain.engine.trainer import Trainer
        cfg = tiny_config(train={{"max_steps": 3}}, data={{"num_images": 64}}, model={model_overrides!r})
        t = Trainer(cfg, {str(tmp_path / 'out')!r}, progress=False)
        t.fit()
        torch.save({{"params": dict(t.model.teacher.named_parameters()),
                    "buffers": dict(t.model.teacher.named_buffers())}},
                   {str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.pt")
        dist.destroy_process_group()
    """))
    a, b = run_torchrun(script, 29533, REPO, tmp_path)
    for k, v in a["params"].items():
        torch.testing.assert_close(v, b["params"][k], rtol=0, atol=0)
    # teacher BN statistics are per device (different data on each rank; no buffer broadcast)
    diff = [k for k in a["buffers"] if k.endswith("running_mean") and not torch.equal(a["buffers"][k], b["buffers"][k])]
    assert diff
    # and the teacher actually moved away from its initialisation on both ranks equally
    assert len(list_checkpoints(tmp_path / "out")) >= 1


def test_knn_monitor_and_gradient_accumulation(tmp_path):
    cfg = tiny_config(train={"max_steps": 2, "accum_steps": 2, "batch_size": 4},
                      data={"knn_train_split": "train", "knn_test_split": "test"},
                      knn={"every_epochs": 0.1, "k": 5, "max_train": 32})
    t = Trainer(cfg, tmp_path, progress=False)
    t.register_hooks(knn_monitor(t))
    assert t.batches_per_epoch == 16 and t.steps_per_epoch == 8 and t.global_batch == 8
    calls = {"n": 0}
    orig = t.optimizer.step

    def counted(*a, **kw):
        calls["n"] += 1
        return orig(*a, **kw)

    t.optimizer.step = counted
    result = t.fit()
    assert calls["n"] == 2  # 4 micro-batches, 2 optimizer steps
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in result["history"])
    assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())


def test_amp_cpu_runs_the_step_in_bf16(tmp_path):
    """``train.amp_cpu``: every convolution of the step runs in bf16 on the CPU (fp32 without
    it); parameters and BN state stay fp32, and the first losses stay close to fp32's (same
    data, init and seed)."""
    losses = {}
    for amp_cpu in (False, True):
        t = Trainer(tiny_config(train={"max_steps": 2, "amp_cpu": amp_cpu}),
                    tmp_path / f"amp_cpu_{amp_cpu}", progress=False)
        seen = set()
        convs = [m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs
        for m in convs:
            m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
        losses[amp_cpu] = [loss for _, loss in _losses(t.fit())]
        assert seen == ({torch.bfloat16} if amp_cpu else {torch.float32})
        assert all(p.dtype == torch.float32 for p in t.model.parameters())
        assert all(b.dtype in (torch.float32, torch.int64) and torch.isfinite(b.float()).all()
                   for b in t.model.buffers())
    assert losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=0.03)

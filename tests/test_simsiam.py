"""SimSiam, a method without an EMA teacher, through the framework: training, exact resume,
export with its own metadata, kNN evaluation and the Detectron2 converter; and MoCo's kNN
monitor on the encoder MoCo exports."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import stop_after_step, tiny_config
from m2_pretrain.checkpoint import CheckpointError, list_checkpoints
from m2_pretrain.engine.trainer import Trainer
from m2_pretrain.eval import knn as knn_mod
from m2_pretrain.export import export_encoder, load_exported_encoder
from m2_pretrain.models.simsiam import SimSiam

REPO = Path(__file__).resolve().parents[1]


def simsiam_cfg(**train):
    return tiny_config(model={"method": "simsiam", "simsiam.dim": 32,
                              "simsiam.pred_hidden": 8},
                       train={"max_steps": 4, **train}, optim={"base_lr": 0.05})


def test_loss_is_the_symmetrised_negative_cosine_with_stop_gradient():
    torch.manual_seed(0)
    m = SimSiam("resnet10t", dim=16, pred_hidden=4)
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = m(v1, v2)["loss"]
    z1, z2 = m.student(v1), m.student(v2)
    p1, p2 = m.predictor(z1), m.predictor(z2)
    want = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
    # the stop-gradient: the loss reaches the projector only through the predictions
    z_only = -(F.cosine_similarity(p1.detach(), z2).mean())
    z_only.backward()
    assert m.predictor[0].weight.grad is None
    m.zero_grad()
    loss.backward()
    assert m.predictor[0].weight.grad.abs().sum() > 0
    assert list(m.checkpoint_parts()) == ["student", "predictor"]
    assert m.evaluated_encoder() is m.student.encoder


@pytest.mark.slow
def test_trains_resumes_exactly_exports_and_evaluates(tmp_path):
    full = Trainer(simsiam_cfg(), tmp_path / "full", progress=False).fit()
    assert full["status"] == "completed"
    assert all("m" not in r and "alpha" not in r for r in full["history"])  # no EMA, no Momentum BN
    part_tr = Trainer(simsiam_cfg(), tmp_path / "part", progress=False)
    stop_after_step(part_tr, 1)
    part = part_tr.fit()
    assert part["step"] == 2
    rest = Trainer(simsiam_cfg(), tmp_path / "part", resume=True, progress=False).fit()
    assert [r["loss"] for r in part["history"] + rest["history"]] == \
        [r["loss"] for r in full["history"]]

    ckpt = list_checkpoints(tmp_path / "full")[-1]
    meta = export_encoder(ckpt, tmp_path / "enc.safetensors")
    sd, header = load_exported_encoder(tmp_path / "enc.safetensors")
    assert header == meta and meta["method"] == "simsiam" and meta["which"] == "student"
    assert meta["student_norm"] == "bn" and "teacher_norm" not in meta and "key_norm" not in meta
    with pytest.raises(CheckpointError, match="simsiam checkpoint has no 'teacher' branch; "
                                              "choose --which student"):
        export_encoder(ckpt, tmp_path / "t.safetensors", which="teacher")
    saved = torch.load(ckpt, weights_only=False)["student"]
    torch.testing.assert_close(sd["conv1.weight"], saved["encoder.conv1.weight"])

    r = subprocess.run([sys.executable, "-m", "m2_pretrain.cli", "knn", "--weights",
                        str(tmp_path / "enc.safetensors"), "--output-dir", str(tmp_path / "knn"),
                        "--no-progress", "data.num_images=64", "data.workers=0", "data.res=32",
                        "knn.k=5", "train.device=cpu", "data.knn_train_split=train",
                        "data.knn_test_split=test"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert 0 <= res["results"]["top1"] <= 100

    r = subprocess.run([sys.executable, "tools/convert_to_d2.py", str(ckpt),
                        str(tmp_path / "d2.pkl")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "d2.pkl", "rb") as f:
        keys = set(pickle.load(f)["model"])
    assert keys and not any("projector" in k or "predictor" in k for k in keys)


@pytest.mark.parametrize("method,branch", [("mocov2", "student"), ("m2", "teacher")])
def test_knn_monitor_reads_the_encoder_export_writes(tmp_path, monkeypatch, method, branch):
    seen = []
    monkeypatch.setattr(knn_mod, "knn_eval_encoder",
                        lambda enc, *a, **kw: seen.append(enc) or {"top1": 1.0, "top5": 2.0})
    model = ({"method": "mocov2", "arch": "resnet10t", "moco_dim": 16, "moco_hidden": 32,
              "moco_queue": 32} if method == "mocov2" else {"arch": "resnet10t"})
    cfg = tiny_config(model=model, train={"max_steps": 2},
                      data={"knn_train_split": "train", "knn_test_split": "test"},
                      knn={"every_epochs": 0.01})
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.register_hooks(knn_mod.knn_monitor(tr))
    tr.fit()
    assert seen and all(enc is getattr(tr.model, branch).encoder for enc in seen)
    meta = export_encoder(list_checkpoints(tmp_path / "run")[-1], tmp_path / "enc.pth")
    assert meta["which"] == branch == tr.model.export_branch
    sd, _ = load_exported_encoder(tmp_path / "enc.pth")
    monitored = seen[-1].state_dict()
    assert set(sd) <= set(monitored) and all(torch.equal(sd[k], monitored[k]) for k in sd)


def test_resume_needs_the_parts_this_method_saves(tmp_path):
    """The framework requires only what every method saves; a checkpoint without a part the
    configured method restores is refused by name (M2 without its teacher)."""
    from m2_pretrain.engine.run_dir import RunDirError

    cfg = tiny_config(train={"max_steps": 2})
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    ckpt_path = list_checkpoints(tmp_path / "run")[-1]
    ckpt = torch.load(ckpt_path, weights_only=False)
    del ckpt["teacher"]
    torch.save(ckpt, ckpt_path)
    with pytest.raises(RunDirError, match="it lacks teacher, which resuming model.method=m2"):
        Trainer(tiny_config(train={"max_steps": 4}), tmp_path / "run", resume=True,
                progress=False)

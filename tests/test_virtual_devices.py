"""Virtual devices (train.bn_group_size): per-group BN statistics inside one process equal what
that many devices compute; DDP equivalence; checkpoints, resume and export keep the state."""

import copy
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from m2_pretrain.checkpoint import list_checkpoints, safe_load
from m2_pretrain.data.sampling import EpochBatchSampler
from m2_pretrain.engine.trainer import Trainer
from m2_pretrain.export import export_encoder
from m2_pretrain.layers import (
    GroupedBatchNorm,
    MomentumBatchNorm,
    apply_norm,
    convert_grouped_bn,
    convert_momentum_bn,
)
from m2_pretrain.models import M2Teacher

from helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)


def test_grouped_bn_model_equals_one_device_per_group():
    """A timm CNN with GroupedBatchNorm(G) on a batch of G groups gives, group by group, the
    outputs, gradients and running statistics of G copies of the plain model fed one group."""
    torch.manual_seed(0)
    G, n = 3, 4
    plain = timm.create_model("resnet10t", num_classes=0)
    _randomise_bn(plain)
    copies = [copy.deepcopy(plain) for _ in range(G)]
    grouped = convert_grouped_bn(copy.deepcopy(plain), G)
    assert not any(type(m) is nn.BatchNorm2d for m in grouped.modules())
    x = torch.randn(G * n, 3, 32, 32)
    y = grouped(x)
    ys = [c(xc) for c, xc in zip(copies, x.chunk(G))]
    torch.testing.assert_close(y, torch.cat(ys), atol=1e-5, rtol=1e-5)
    (y ** 2).sum().backward()
    sum((yc ** 2).sum() for yc in ys).backward()
    w = "conv1.0.weight"
    want = sum(dict(c.named_parameters())[w].grad for c in copies)
    got = dict(grouped.named_parameters())[w].grad
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # float summation order only
    gsd = grouped.state_dict()
    for g, c in enumerate(copies):
        for k, v in c.state_dict().items():
            if k.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(gsd[k][g], v, atol=1e-6, rtol=1e-5)
    # eval mode uses group 0's statistics, i.e. rank 0's model
    grouped.eval(), copies[0].eval()
    torch.testing.assert_close(grouped(x), copies[0](x), atol=1e-5, rtol=1e-5)


def test_momentum_bn_groups_equal_single_device_layers():
    """Each group of a G-group Momentum BN (input [view][group][sample]) equals the one-device
    layer fed that group's two views, running statistics included (lazy update per group)."""
    torch.manual_seed(0)
    G, n, C = 3, 4, 5
    big = MomentumBatchNorm(C, num_views=2, alpha=0.7, num_groups=G)
    with torch.no_grad():
        big.weight.uniform_(0.5, 1.5)
        big.bias.normal_()
        big.running_mean.normal_()
        big.running_var.uniform_(0.5, 2.0)
    singles = []
    for g in range(G):
        s = MomentumBatchNorm(C, num_views=2, alpha=0.7)
        s.load_state_dict({k: (v[g] if k.startswith("running_") else v)
                           for k, v in big.state_dict().items()})
        singles.append(s)
    for it in range(2):  # two iterations: the second mixes in the lazily updated statistics
        x = torch.randn(2 * G * n, C, 3, 3) * 2 + 1
        y = big(x).view(2, G, n, C, 3, 3)
        xv = x.view(2, G, n, C, 3, 3)
        for g, s in enumerate(singles):
            yg = s(torch.cat([xv[0, g], xv[1, g]])).view(2, n, C, 3, 3)
            torch.testing.assert_close(y[:, g], yg, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(big.running_mean[g], s.running_mean, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(big.running_var[g], s.running_var, atol=1e-6, rtol=1e-6)
    assert int(big.num_batches_tracked) == 2
    big.eval(), singles[0].eval()
    x = torch.randn(4, C, 3, 3)
    torch.testing.assert_close(big(x), singles[0](x))
    # one group keeps today's (C,) buffers and state-dict keys
    assert MomentumBatchNorm(C).running_mean.shape == (C,)
    conv = convert_momentum_bn(nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)), 2, 1.0, G)
    assert conv[1].running_var.shape == (G, C) and conv[1].num_groups == G


def test_sync_normalises_the_whole_batch_and_bn_per_group():
    """student_norm/teacher_norm 'sync' in one process = BN over each view's whole batch (the
    same loss as a one-device model); 'bn' with groups differs from it."""
    torch.manual_seed(0)
    v1, v2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    kw = dict(arch="resnet10t", proj_hidden=32, proj_out=16, pred_hidden=32)
    torch.manual_seed(1)
    one = M2Teacher(**kw, teacher_norm="bn")
    torch.manual_seed(1)
    sync = M2Teacher(**kw, teacher_norm="sync", student_norm="sync", bn_groups=4)
    torch.manual_seed(1)
    grouped = M2Teacher(**kw, teacher_norm="bn", student_norm="bn", bn_groups=4)
    assert not any(isinstance(m, GroupedBatchNorm) for m in sync.modules())
    assert sum(isinstance(m, GroupedBatchNorm) for m in grouped.predictor.modules()) == 1
    l_one, l_sync, l_grp = (m(v1, v2)["loss"].item() for m in (one, sync, grouped))
    assert l_sync == pytest.approx(l_one, abs=1e-6)
    assert abs(l_grp - l_one) > 1e-3
    with pytest.raises(ValueError, match="not divisible into 4 BN groups"):
        grouped(v1[:6], v2[:6])
    with pytest.raises(ValueError, match="unknown norm"):
        apply_norm(nn.BatchNorm2d(3), "ghost")
    # across processes 'sync' is SyncBatchNorm (timm's BatchNormAct2d included)
    enc = apply_norm(timm.create_model("resnet10t", num_classes=0), "sync", distributed=True)
    assert not any(type(m) is nn.BatchNorm2d for m in enc.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in enc.modules()) > 5


def test_sampler_groups_hold_what_each_rank_holds():
    n, g, seed = 100, 4, 3
    one = EpochBatchSampler(n, 2 * g, seed, groups=2)
    ranks = [EpochBatchSampler(n, g, seed, rank=r, world=2) for r in range(2)]
    assert one.batches_per_epoch == ranks[0].batches_per_epoch == 12
    for epoch in (0, 1):
        for s in [one] + ranks:
            s.set_position(epoch, 0)
        for b_one, b0, b1 in zip(one, *ranks):
            assert b_one == b0 + b1
    # groups inside each of two processes: rank r holds virtual devices 2r and 2r + 1
    quad = [EpochBatchSampler(n, 2, seed, rank=r, world=4) for r in range(4)]
    halves = [EpochBatchSampler(n, 4, seed, rank=r, world=2, groups=2) for r in range(2)]
    for b in zip(*halves, *quad):
        assert b[0] == b[2] + b[3] and b[1] == b[4] + b[5]


def test_grouped_checkpoint_resume_and_export(tmp_path):
    cfg = tiny_config(model={"arch": "resnet10t"},
                      train={"max_steps": 4, "bn_group_size": 4, "batch_size": 8},
                      checkpoint={"every_steps": 2})
    full = Trainer(cfg, tmp_path / "full", progress=False)
    bn = full.model.teacher.encoder.bn1 if hasattr(full.model.teacher.encoder, "bn1") else None
    assert isinstance(bn, MomentumBatchNorm) and bn.running_mean.shape == (2, bn.num_features)
    full.fit()
    ckpts = list_checkpoints(tmp_path / "full")
    (tmp_path / "part").mkdir()
    shutil.copy(ckpts[0], tmp_path / "part" / ckpts[0].name)  # the step-2 checkpoint
    other = tiny_config(model={"arch": "resnet10t"},
                        train={"max_steps": 4, "bn_group_size": 2, "batch_size": 8})
    with pytest.raises(RuntimeError, match=r"train.bn_group_size: 4 -> 2"):
        Trainer(other, tmp_path / "part", resume=True, progress=False)
    # even with config changes allowed, the per-group state cannot be carried over
    with pytest.raises(RuntimeError, match="trained with 2 BN groups per batch"):
        Trainer(other, tmp_path / "part", resume=True, progress=False, allow_config_changes=True)
    rest = Trainer(cfg, tmp_path / "part", resume=True, progress=False)
    assert rest.step == 2
    rest.fit()
    a = safe_load(list_checkpoints(tmp_path / "full")[-1])
    b = safe_load(list_checkpoints(tmp_path / "part")[-1])
    assert a["meta"]["bn_groups"] == 2 and a["meta"]["bn_group_size"] == 4
    for k, v in a["teacher"].items():
        torch.testing.assert_close(v, b["teacher"][k], rtol=0, atol=0)
    stats = a["teacher"]["encoder.bn1.running_mean"]
    assert stats.shape[0] == 2 and not torch.equal(stats[0], stats[1])  # per-device statistics
    meta = export_encoder(list_checkpoints(tmp_path / "full")[-1], tmp_path / "enc.pth")
    assert meta["bn_statistics"].startswith("group 0 of 2")
    sd = safe_load(tmp_path / "enc.pth")
    torch.testing.assert_close(sd["bn1.running_mean"], stats[0], rtol=0, atol=0)
    timm.create_model("resnet10t", num_classes=0).load_state_dict(sd, strict=True)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_two_groups(tmp_path):
    """2 gloo processes with a batch of g each == 1 process with a batch of 2g and
    bn_group_size=g: losses, teacher weights, and teacher BN statistics (rank r = group r),
    for a BN teacher and a Momentum BN teacher."""
    g, steps = 4, 3
    teachers = ["bn", "momentum"]
    common = dict(model={"arch": "resnet10t"}, data={"num_images": 32},
                  checkpoint={"every_steps": 100})
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from helpers import tiny_config
        from m2_pretrain.engine.trainer import Trainer
        common = {common!r}
        for tn in {teachers!r}:
            cfg = tiny_config(train={{"max_steps": {steps}, "batch_size": {g}}},
                              **{{**common, "model": {{**common["model"], "teacher_norm": tn}}}})
            t = Trainer(cfg, {str(tmp_path)!r} + f"/ddp_{{tn}}", progress=False)
            res = t.fit()
            torch.save({{"loss": [r["loss"] for r in res["history"]],
                        "params": dict(t.model.teacher.named_parameters()),
                        "buffers": dict(t.model.teacher.named_buffers())}},
                       {str(tmp_path)!r} + f"/{{tn}}_rank{{dist.get_rank()}}.pt")
        dist.destroy_process_group()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29537", str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    single = {}
    for tn in teachers:  # meanwhile, the one-process runs
        cfg = tiny_config(train={"max_steps": steps, "batch_size": 2 * g, "bn_group_size": g},
                          **{**common, "model": {**common["model"], "teacher_norm": tn}})
        t = Trainer(cfg, tmp_path / f"one_{tn}", progress=False)
        res = t.fit()
        single[tn] = ([r["loss"] for r in res["history"]], dict(t.model.teacher.named_parameters()),
                      dict(t.model.teacher.named_buffers()))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    for tn in teachers:
        r0, r1 = (torch.load(tmp_path / f"{tn}_rank{r}.pt", weights_only=True) for r in range(2))
        loss, params, buffers = single[tn]
        assert len(loss) == steps
        # each rank logs its own loss; the one-process loss is the mean over the whole batch
        torch.testing.assert_close(torch.tensor(loss),
                                   (torch.tensor(r0["loss"]) + torch.tensor(r1["loss"])) / 2,
                                   atol=1e-5, rtol=1e-5)
        for k, v in params.items():
            torch.testing.assert_close(v, r0["params"][k], atol=2e-5, rtol=1e-4)
        n_stats = 0
        for k, v in buffers.items():
            if k.endswith(("running_mean", "running_var")):
                for rank, r in enumerate((r0, r1)):
                    torch.testing.assert_close(v[rank], r["buffers"][k], atol=2e-5, rtol=1e-4)
                n_stats += 1
        assert n_stats > 10

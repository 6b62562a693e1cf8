"""No host synchronisation inside a training step (M2 and MoCo v2, colour augmentation on the
device or in the loader, Momentum BN fused or composite), checked on CPU by following device
tensors through the step's ops (``sync_check.SyncRecorder``); on CUDA, under
``torch.cuda.set_sync_debug_mode("error")``."""

import contextlib

import pytest
import torch

from m2_pretrain.engine.trainer import Trainer

from cpu_bn_kernels import cpu_bn_kernels
from helpers import tiny_config
from sync_check import SyncRecorder, module_tensors, optimizer_tensors


def test_recorder_flags_each_kind_of_sync_and_nothing_else():
    buf, x = torch.zeros(()), torch.randn(6)
    cases = {
        "int": lambda: int(buf),
        "bool": lambda: bool(x.sum() > 0),
        "nonzero": lambda: (x > 0).nonzero(),
        "mask": lambda: x[x > 0],
        "copy from Python data": lambda: buf.copy_(torch.as_tensor(0.5)),
        "constant from Python data": lambda: x * torch.tensor([1.0, 2.0, 3.0] * 2),
    }
    for name, fn in cases.items():
        with SyncRecorder([buf, x]) as rec:
            fn()
        assert rec.violations, name
    with SyncRecorder([buf, x]) as rec:  # device-side equivalents, host-only work
        buf.fill_(0.5)
        y = x[torch.arange(3)] * torch.arange(3.0, dtype=x.dtype)
        torch.where(x > 0, x, 0.0).sum()
        host = torch.rand(5)
        idx = (host > 0.5).nonzero()  # a host tensor: no device involved
        float(host.sum()), len(idx), y + host[:3]
    assert rec.violations == [], rec.violations
    assert len(rec.ops) > 8


def _record_step(trainer: Trainer) -> SyncRecorder:
    """One warm-up step (optimizer state), then the next step under the recorder, with its
    batch taken from the loader beforehand."""
    with trainer._fit_session():
        trainer.model.train()
        trainer.run_step()
        batch = trainer.next_batch()
        trainer.next_batch = lambda: batch
        dev = module_tensors(trainer.model, trainer.feed.batch_aug, trainer.feed.normalizer)
        dev += optimizer_tensors(trainer.optimizer)
        dev += [trainer._fit.first_bad, trainer._fit.log.window.loss_sum, *batch]
        with SyncRecorder(dev) as rec:
            trainer.run_step()
    return rec


@pytest.mark.slow
@pytest.mark.parametrize("method,augment,fused", [
    ("m2", "cuda", True), ("m2", "cpu", False), ("mocov2", "cuda", True),
    ("mocov2", "cpu", False),
])
def test_training_step_has_no_host_sync(tmp_path, method, augment, fused):
    model = {"method": method, "arch": "resnet10t"}
    if method == "mocov2":
        model.update(key_norm="momentum", moco_queue=32, moco_hidden=32, moco_dim=16)
    cfg = tiny_config(model=model, data={"augment_device": augment},
                      train={"grad_clip": 1.0})
    with cpu_bn_kernels() if fused else contextlib.nullcontext() as calls:
        rec = _record_step(Trainer(cfg, tmp_path, progress=False))
    assert rec.violations == [], rec.violations[:5]
    assert len(rec.ops) > 300  # the step really ran under the recorder
    if fused:  # the teacher's Momentum BN took the fused path
        assert calls["stats"] > 0 and calls["elemt"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: set_sync_debug_mode only sees CUDA syncs")
@pytest.mark.parametrize("method,augment", [("m2", "cuda"), ("m2", "cpu"), ("mocov2", "cuda")])
def test_cuda_step_under_sync_debug_mode_error(tmp_path, method, augment):
    model = {"method": method, "arch": "resnet10t"}
    if method == "mocov2":
        model.update(key_norm="momentum", moco_queue=64, moco_hidden=32, moco_dim=16)
    cfg = tiny_config(model=model, data={"augment_device": augment},
                      train={"device": "cuda", "amp": True, "grad_clip": 1.0})
    t = Trainer(cfg, tmp_path, progress=False)
    with t._fit_session():
        t.model.train()
        t.run_step()  # warm-up: optimizer state, cuDNN plans, allocator
        batches = [t.next_batch() for _ in range(2)]
        t.next_batch = lambda: batches.pop(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            t.run_step()
            t.run_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        t._host_sync_checks()  # the step's results are readable afterwards
    assert t.step == 3

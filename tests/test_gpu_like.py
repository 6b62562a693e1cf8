"""The CUDA path as a GPU runs the default configuration, on the CPU.

The ``gpu_like`` fixture registers the CUDA kernels' contract stand-ins
(``tests/cpu_bn_kernels.py``: ``fused_kernels_available`` is then True on the CPU), turns on
CPU autocast in bf16 (and fp16 where this CPU runs it), and makes the trainer lay out the
model and the views channels-last (``trainer.CHANNELS_LAST_DEVICES``), as ``train.amp`` and
``train.channels_last`` do on CUDA. Under it: the Momentum BN layer at 1, 2 and 8 groups of
one image, a full trainer step of each default method setting with the device augmentation,
and one step of every ``benchmarks/speed.py`` arm. The Momentum BN self-check is tested with
a deliberately wrong ``batch_norm_elemt``.
"""

import argparse
import logging
import sys
from pathlib import Path

import pytest
import torch

import cpu_bn_kernels as K
from helpers import tiny_config
from m2_pretrain.checkpoint import checkpoint_path
from m2_pretrain.engine import trainer as trainer_mod
from m2_pretrain.export import export_encoder, load_exported_encoder
from m2_pretrain.layers import fused_bn as FB
from m2_pretrain.layers.momentum_bn import MomentumBatchNorm, momentum_bn_modules
from test_fused_bn import ALPHAS, plain_momentum_bn

REPO = Path(__file__).resolve().parents[1]


def _cpu_autocast_runs(dtype: torch.dtype) -> bool:
    """Whether a channels-last convolution runs under CPU autocast in ``dtype`` here."""
    try:
        conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        x = torch.randn(1, 3, 5, 5).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=dtype):
            return conv(x).dtype == dtype
    except RuntimeError:
        return False


AMP = [torch.bfloat16] + [
    pytest.param(torch.float16, marks=pytest.mark.skipif(
        not _cpu_autocast_runs(torch.float16), reason="this CPU has no fp16 autocast kernels"))]


@pytest.fixture
def gpu_like(monkeypatch):
    """Contract kernels registered, a clean self-check record, channels-last on the CPU.
    Yields the kernels' call counters; autocast is entered by each test (its dtype is a
    parameter) or by the trainer (``train.amp_cpu``)."""
    monkeypatch.setattr(trainer_mod, "CHANNELS_LAST_DEVICES", ("cuda", "cpu"))
    FB.reset_self_check()
    with K.cpu_bn_kernels() as calls:
        yield calls
    FB.reset_self_check()


def _layer_input(V, G, C, spatial, dtype, k):
    """What a convolution or linear layer hands Momentum BN under autocast: ``dtype``,
    channels-last for 4-D."""
    x = torch.randn(V * G, C, *spatial, generator=torch.Generator().manual_seed(k)) * 2 + k
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("V,G,spatial", [(2, 1, (4, 4)), (2, 2, (4, 4)), (2, 8, (3, 3)),
                                          (1, 8, (4, 4)), (2, 2, ())])
def test_layer_under_autocast_on_the_contract_kernels(gpu_like, amp, V, G, spatial):
    """One image per (view, group), as the smallest virtual-device groups on a GPU: the fused
    path runs, the output keeps the input's dtype and layout, the statistics are fp32 (the
    running ones to fp32 precision, not rounded to ``amp``)."""
    C = 6
    layer = MomentumBatchNorm(C, num_views=V, num_groups=G).requires_grad_(False)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    rm_ref = torch.zeros(G, C, dtype=torch.float64)
    rv_ref = torch.ones(G, C, dtype=torch.float64)
    for k, a in enumerate(ALPHAS):
        layer.set_alpha(a)
        x = _layer_input(V, G, C, spatial, amp, k)
        with torch.autocast("cpu", dtype=amp), torch.no_grad():
            y = layer(x)
        want = plain_momentum_bn(x, V, G, rm_ref, rv_ref, a, layer.weight, layer.bias, 1e-5)
        assert y.dtype == amp and y.shape == x.shape
        if x.dim() == 4:
            assert y.is_contiguous(memory_format=torch.channels_last)
        err = (y.double() - want).abs().max().item()
        assert err <= 4 * torch.finfo(amp).eps * max(1.0, want.abs().max().item()), err
        assert layer.running_mean.dtype == torch.float32
        rm, rv = layer.running_mean.view(G, C).double(), layer.running_var.view(G, C).double()
        # bf16/fp16 rounding of the statistics would be ~1e-3 relative
        assert torch.allclose(rm, rm_ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(rv, rv_ref, rtol=1e-5, atol=1e-5)
    assert gpu_like["elemt"] >= len(ALPHAS) and gpu_like["stats"] >= len(ALPHAS) * V * G
    assert FB.fused_bn_status().startswith("enabled (checked on cpu")


@pytest.mark.parametrize("amp", AMP)
def test_composite_under_autocast_keeps_fp32_statistics(amp):
    """The composite (``torch.compile``, gradients) under autocast: the same contract."""
    V, G, C = 2, 2, 5
    x = _layer_input(V, G, C, (4, 4), amp, 3)
    rm, rv = torch.zeros(G, C), torch.ones(G, C)
    rm_ref, rv_ref = torch.zeros(G, C, dtype=torch.float64), torch.ones(G, C, dtype=torch.float64)
    with torch.autocast("cpu", dtype=amp):
        y = FB.momentum_bn_train_composite(x, V, G, rm, rv, torch.tensor(0.3), None, None, 1e-5)
    want = plain_momentum_bn(x, V, G, rm_ref, rv_ref, 0.3, None, None, 1e-5)
    assert y.dtype == amp and y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - want).abs().max().item() <= 4 * torch.finfo(amp).eps * 8
    assert torch.allclose(rm.double(), rm_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rv.double(), rv_ref, rtol=1e-5, atol=1e-6)


METHODS = [
    pytest.param({"model": {"method": "m2", "teacher_norm": "momentum"}}, id="m2"),
    pytest.param({"model": {"method": "mocov2", "moco.key_norm": "momentum"}},
                 id="mocov2-momentum"),
    pytest.param({"model": {"method": "mocov2", "moco.key_norm": "shuffle_bn"}},
                 id="mocov2-shuffle_bn"),
]


@pytest.mark.slow
@pytest.mark.parametrize("sections", METHODS)
def test_trainer_step_as_on_a_gpu(gpu_like, tmp_path, sections):
    """Two real trainer steps of each default method setting: bf16 autocast
    (``train.amp``), channels-last, the batched device augmentation, the fused kernels."""
    overrides = {"train": {"amp": "true", "amp_cpu": "true", "channels_last": "true",
                           "max_steps": 2, "batch_size": 4},
                 "data": {"augment_device": "cuda"}, "checkpoint": {"every_steps": 2}}
    for sec, kv in sections.items():
        overrides.setdefault(sec, {}).update(kv)
    cfg = tiny_config(**overrides)
    tr = trainer_mod.Trainer(cfg, tmp_path / "run", progress=False)
    assert FB.fused_kernels_available(torch.empty(1, 1))
    assert tr.amp_dtype == torch.bfloat16 and tr.memory_format == torch.channels_last
    assert tr.feed.augment_mode == "device"
    seen = []
    orig = tr.augment
    tr.augment = lambda batch: seen.append(orig(batch)) or seen[-1]
    out = tr.fit()
    assert out["status"] == "completed" and out["step"] == 2
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in seen[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out["history"] if "loss" in r)
    uses_momentum_bn = bool(momentum_bn_modules(tr.model))
    assert uses_momentum_bn == ("momentum" in sections["model"].values())
    if uses_momentum_bn:
        assert gpu_like["elemt"] > 0 and gpu_like["stats"] > 0
        for m in momentum_bn_modules(tr.model):
            assert m.running_mean.dtype == torch.float32 and torch.isfinite(m.running_var).all()
    ckpt = torch.load(checkpoint_path(tmp_path / "run", 2), weights_only=False)
    want = "enabled (checked on cpu bfloat16" if uses_momentum_bn else "not used"
    assert ckpt["meta"]["fused_bn"].startswith(want)


def _speed_args(**kw):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import speed

    args = argparse.Namespace(device="cpu", arch="resnet18", res=32, batch=4, bn_group_size=2,
                              compile=False, moco=True, peer=None, cpu_bf16=False, warmup=0,
                              repeats=1, inner=1, proj_hidden=32, proj_out=16, amp="bf16",
                              channels_last=True, arms=None, json=None)
    vars(args).update(kw)
    return speed, args


@pytest.mark.slow
def test_speed_arms_one_step_each(gpu_like, tmp_path):
    """Every arm of ``benchmarks/speed.py`` runs one step in bf16 on the fused kernels, and the
    JSON written after each arm holds every arm that finished."""
    speed, args = _speed_args(json=str(tmp_path / "speed.json"))
    arms = ["ceiling", "byol_bn", "m2", "m2_reference", "m2_grouped", "mocov2_shuffle",
            "mocov2_momentum", "m2_augment"]
    written = []
    res = speed.bench_steps(args, arms=arms, on_arm=lambda r: written.append(sorted(r["arms"])))
    assert sorted(res["arms"]) == sorted(arms)
    assert all(len(r["all_s"]) == 1 for r in res["arms"].values())
    assert written[0] == ["ceiling"] and written[len(arms) - 1] == sorted(arms)
    assert gpu_like["elemt"] > 0
    assert FB.fused_bn_status().startswith("enabled")


# ----------------------------------------------------------------------------- self-check
def _wrong_elemt(x, weight, bias, mean, invstd, eps):
    """A ``batch_norm_elemt`` that forgets to subtract the mean."""
    return K.elemt_kernel(x, weight, bias, torch.zeros_like(mean), invstd, eps)


def _wrong_elemt_out(x, weight, bias, mean, invstd, eps, *, out):
    return K.elemt_out_kernel(x, weight, bias, torch.zeros_like(mean), invstd, eps, out=out)


@pytest.fixture
def wrong_kernels():
    """The contract kernels with a ``batch_norm_elemt`` that ignores the mean."""
    FB.reset_self_check()
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("batch_norm_update_stats", K.stats_kernel, "CPU")
        lib.impl("batch_norm_elemt", _wrong_elemt, "CPU")
        lib.impl("batch_norm_elemt.out", _wrong_elemt_out, "CPU")
        yield
    finally:
        lib._destroy()
        FB.reset_self_check()


def test_self_check_disables_a_wrong_kernel_and_records_it(wrong_kernels, caplog):
    V, G, C = 2, 2, 4
    layer = MomentumBatchNorm(C, num_views=V, num_groups=G).requires_grad_(False)
    with torch.no_grad():
        layer.bias.fill_(0.5)
    ref = MomentumBatchNorm(C, num_views=V, num_groups=G).requires_grad_(False)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(8, C, 3, 3) + 1
    with caplog.at_level(logging.WARNING, logger=FB.__name__), torch.no_grad():
        y = layer(x)
        y2 = layer(x + 1)
        K.CALLS.update(stats=0, elemt=0)
        y3 = layer(x - 1)
    assert K.CALLS["elemt"] == 0  # disabled: the composite from then on
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and torch.__version__ in lines[0] and "cpu" in lines[0]
    assert "output differs from the composite" in lines[0]
    status = FB.fused_bn_status()
    assert status.startswith("disabled (cpu float32: output differs from the composite")
    # every output is the composite's, and so is the layer state
    with torch.no_grad():
        for got, inp in ((y, x), (y2, x + 1), (y3, x - 1)):
            want = FB.momentum_bn_train_composite(inp, V, G, ref.running_mean, ref.running_var,
                                                  ref.alpha, ref.weight, ref.bias, ref.eps)
            assert torch.equal(got, want)
    assert torch.equal(layer.running_mean, ref.running_mean)


@pytest.mark.slow
def test_disabled_fused_path_is_recorded_in_checkpoint_and_export_header(wrong_kernels,
                                                                          tmp_path):
    cfg = tiny_config(train={"max_steps": 2, "batch_size": 4}, checkpoint={"every_steps": 2})
    tr = trainer_mod.Trainer(cfg, tmp_path / "run", progress=False)
    assert tr.fit()["status"] == "completed"
    ckpt = checkpoint_path(tmp_path / "run", 2)
    status = torch.load(ckpt, weights_only=False)["meta"]["fused_bn"]
    assert status.startswith("disabled (cpu float32: output differs from the composite")
    _, meta = load_exported_encoder(tmp_path / "enc.safetensors") if export_encoder(
        ckpt, tmp_path / "enc.safetensors") else (None, None)
    assert meta["fused_bn"] == status


def test_self_check_disables_a_kernel_that_raises_without_touching_the_state(caplog):
    """The error of the unfixed mix (fp16 statistics into the kernel) as a self-check
    failure: caught, logged once, the running statistics as the composite leaves them."""
    FB.reset_self_check()
    calls = []

    def raising(*a, **kw):
        calls.append(1)
        raise RuntimeError("batch_norm_elemt: mean must be fp32")

    layer = MomentumBatchNorm(4, num_views=2).requires_grad_(False)
    x = torch.randn(4, 4, 2, 2)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    try:
        with caplog.at_level(logging.WARNING, logger=FB.__name__):
            y = FB._self_checked("test", lambda *a: FB.momentum_bn_train(*a, elemt_fn=raising),
                                 (x, 2, 1, layer.running_mean, layer.running_var, layer.alpha,
                                  layer.weight, layer.bias, layer.eps))
        want = FB.momentum_bn_train_composite(x, 2, 1, rm, rv, layer.alpha, layer.weight,
                                              layer.bias, layer.eps)
        assert calls and torch.equal(y, want)
        assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv)
        assert "RuntimeError: batch_norm_elemt: mean must be fp32" in FB.fused_bn_status()
        assert len(caplog.records) == 1
    finally:
        FB.reset_self_check()


def test_self_check_runs_once_per_device_and_dtype(gpu_like):
    layer = MomentumBatchNorm(4, num_views=2).requires_grad_(False)
    layer.set_alpha(0.5)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(4, 4, 2, 2) * 3 + 1
    with torch.no_grad():
        y = layer(x)
        first = dict(gpu_like)
        # a passed check keeps the fused result, bit for bit (resume stays exact)
        want = FB.momentum_bn_train(x, 2, 1, rm, rv, layer.alpha, layer.weight, layer.bias,
                                    layer.eps)
        assert torch.equal(y, want) and torch.equal(layer.running_mean, rm)
        assert torch.equal(layer.running_var, rv)
        gpu_like.update(stats=first["stats"], elemt=first["elemt"])
        layer(x)
    # the first call ran the composite beside the fused path; the second only the fused path
    assert first == {"stats": 2, "elemt": 2}
    assert gpu_like == {"stats": 4, "elemt": 4}
    assert FB.fused_bn_status() == "enabled (checked on cpu float32)"


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_trainer_default_config_two_steps(tmp_path):
    """What the CPU mode cannot reach (``make gpu-check`` runs it): the real CUDA kernels, the
    CUDA branches of the trainer (bf16 autocast and channels-last by default, device
    augmentation by ``auto``, pinned uploads) and the self-check on the GPU."""
    cfg = tiny_config(train={"device": "cuda", "max_steps": 2, "batch_size": 4},
                      checkpoint={"every_steps": 2})
    tr = trainer_mod.Trainer(cfg, tmp_path / "run", progress=False)
    assert tr.amp_dtype == torch.bfloat16 and tr.memory_format == torch.channels_last
    assert tr.feed.augment_mode == "device"
    assert tr.fit()["status"] == "completed"
    assert FB.fused_bn_status() == "enabled (checked on cuda:0 bfloat16)"
    ckpt = torch.load(checkpoint_path(tmp_path / "run", 2), weights_only=False)
    assert ckpt["meta"]["fused_bn"] == "enabled (checked on cuda:0 bfloat16)"

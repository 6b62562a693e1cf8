"""Momentum BN at plain-BN cost: the fused path with CPU kernels injected or registered
(tests/cpu_bn_kernels.py) and the composite, against an independent plain implementation; the
CUDA path (skipped without a GPU)."""

import pytest
import torch

from m2_pretrain.layers import fused_bn as FB

import cpu_bn_kernels as K

ALPHAS = [1.0, 0.7, 0.3, 0.05]


def plain_momentum_bn(x, V, G, rm, rv, alpha, w, b, eps):
    """Independent fp64 loop over (view, group) slices; updates rm/rv (G, C) in place."""
    n, C = x.shape[0] // (V * G), x.shape[1]
    xd = x.double()
    y = torch.empty_like(xd)
    mus = torch.zeros(V, G, C, dtype=torch.float64)
    vars_ = torch.zeros(V, G, C, dtype=torch.float64)
    for v in range(V):
        for g in range(G):
            lo = (v * G + g) * n
            s = xd[lo : lo + n].transpose(0, 1).reshape(C, -1)
            mu = s.mean(1)
            var = ((s - mu[:, None]) ** 2).mean(1)
            mus[v, g], vars_[v, g] = mu, var
            m = alpha * mu + (1 - alpha) * rm[g].double()
            va = alpha * var + (1 - alpha) * rv[g].double()
            shape = (1, C) + (1,) * (x.dim() - 2)
            out = (xd[lo : lo + n] - m.view(shape)) / torch.sqrt(va + eps).view(shape)
            if w is not None:
                out = out * w.double().view(shape) + b.double().view(shape)
            y[lo : lo + n] = out
    rm.copy_(alpha * mus.mean(0) + (1 - alpha) * rm.double())
    rv.copy_(alpha * vars_.mean(0) + (1 - alpha) * rv.double())
    return y


def _inputs(V, G, n, C, spatial, k, dtype=torch.float32, channels_last=False):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(V * G * n, C, *spatial, generator=gen) * (1 + k) + 0.5 * k
    x[:, 0] = 3.0  # a constant channel: variance exactly 0
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _fresh_state(G, C):
    """Affine weights, the layer's running statistics (fp32, (C,) or (G, C)), the oracle's fp64
    ones and an α buffer at 1."""
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm = torch.zeros(G, C) if G > 1 else torch.zeros(C)
    rv = torch.ones_like(rm)
    rm_ref, rv_ref = torch.zeros(G, C, dtype=torch.float64), torch.ones(G, C, dtype=torch.float64)
    return w, b, rm, rv, rm_ref, rv_ref, torch.tensor(1.0)


def _run_shared(x, V, G, rm, rv, alpha, w, b):
    return FB.momentum_bn_train(x, V, G, rm, rv, alpha, w, b, 1e-5, K.stats_kernel, K.elemt)


@pytest.mark.parametrize("V,G,spatial,dtype,channels_last", [
    (2, 2, (4, 4), torch.float32, False),
    (2, 3, (4, 4), torch.float32, True),
    (2, 1, (), torch.float32, False),  # (B, C) input of the projector's BatchNorm1d
    (1, 2, (3, 5), torch.float32, False),  # MoCo's key encoder: one view
    (2, 2, (4, 4), torch.bfloat16, True),
])
def test_shared_math_equals_plain_over_iterations(V, G, spatial, dtype, channels_last):
    C, n, eps = 5, 3, 1e-5
    w, b, rm, rv, rm_ref, rv_ref, alpha = _fresh_state(G, C)
    for k, a in enumerate(ALPHAS):
        alpha.fill_(a)  # in place, as the layer's buffer
        x = _inputs(V, G, n, C, spatial, k, dtype, channels_last)
        y = _run_shared(x, V, G, rm, rv, alpha, w, b)
        want = plain_momentum_bn(x, V, G, rm_ref, rv_ref, a, w, b, eps)
        assert y.dtype == dtype and y.shape == x.shape
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
        tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y.double(), want, **tol)
        # fp32 statistics: running buffers match to fp32 precision even for a bf16 input
        torch.testing.assert_close(rm.view(G, C).double(), rm_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rv.view(G, C).double(), rv_ref, atol=1e-5, rtol=1e-5)
    assert rv.view(G, C)[:, 0].max() < 0.1  # the constant channel's variance decayed


def test_mix_in_fp64_where_fp32_products_are_reduced_precision(monkeypatch):
    """Where fp32 matrix products would run as TF32/bf16, the statistics mix runs in fp64 and
    gives the same result."""
    assert FB._ieee_matmul(torch.zeros(1))  # the default precision
    V, G, C, eps = 2, 3, 5, 1e-5
    w, b, rm, rv, rm_ref, rv_ref, alpha = _fresh_state(G, C)
    monkeypatch.setattr(FB, "_ieee_matmul", lambda t: False)
    for k, a in enumerate(ALPHAS):
        alpha.fill_(a)
        x = _inputs(V, G, 3, C, (4, 4), k)
        y = _run_shared(x, V, G, rm, rv, alpha, w, b)
        want = plain_momentum_bn(x, V, G, rm_ref, rv_ref, a, w, b, eps)
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rv.double(), rv_ref, atol=1e-5, rtol=1e-5)
        assert rm.dtype == rv.dtype == torch.float32


def test_plain_fallback_is_differentiable_and_equal():
    V, G, C = 2, 2, 4
    x = _inputs(V, G, 3, C, (3, 3), 1).requires_grad_(True)
    w, b = (torch.rand(C) + 0.5).requires_grad_(True), torch.randn(C).requires_grad_(True)
    rm1, rv1 = torch.zeros(G, C), torch.ones(G, C)
    rm2, rv2 = rm1.clone(), rv1.clone()
    alpha = torch.tensor(0.6)
    y = FB.momentum_bn_train_fused(x, V, G, rm1, rv1, alpha, w, b, 1e-5)  # CPU + grad: fallback
    with torch.no_grad():
        want = _run_shared(x, V, G, rm2, rv2, alpha, w, b)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)
    y.square().sum().backward()
    assert x.grad is not None and w.grad is not None and torch.isfinite(x.grad).all()


def test_shape_errors_name_the_problem():
    x = torch.randn(6, 3, 2, 2)
    with pytest.raises(ValueError, match="2 views x 2 groups"):
        _run_shared(x, 2, 2, torch.zeros(2, 3), torch.ones(2, 3), torch.tensor(1.0), None, None)
    with pytest.raises(ValueError, match="running statistics"):
        _run_shared(x, 2, 3, torch.zeros(3), torch.ones(3), torch.tensor(1.0), None, None)


def test_compiled_entry_is_the_composite_no_graph_break_no_recompile_when_alpha_changes():
    """Compiled, the entry point traces the composite (one graph, α an input value) and gives
    the fused path's results."""
    import torch._dynamo as dynamo

    V, G, C = 2, 2, 4
    fn = torch.compile(FB.momentum_bn_train_fused, backend="aot_eager", fullgraph=True)
    rm, rv = torch.zeros(G, C), torch.ones(G, C)
    rm_e, rv_e = rm.clone(), rv.clone()
    alpha = torch.tensor(1.0)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    dynamo.reset()
    with dynamo.config.patch(error_on_recompile=True):
        for k, a in enumerate(ALPHAS):
            alpha.fill_(a)
            x = _inputs(V, G, 3, C, (3, 3), k)
            y = fn(x, V, G, rm, rv, alpha, w, b, 1e-5)
            want = _run_shared(x, V, G, rm_e, rv_e, alpha, w, b)
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rm, rm_e, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(rv, rv_e, atol=1e-6, rtol=1e-6)
    # and a fresh alpha tensor with another value is a new input value, not a new graph
    with dynamo.config.patch(error_on_recompile=True):
        fn(_inputs(V, G, 3, C, (3, 3), 9), V, G, rm, rv, torch.tensor(0.123), w, b, 1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("G", [1, 4])
def test_cuda_fused_equals_cpu_path_to_bf16_rounding(G):
    V, n, C = 2, 8, 64
    torch.manual_seed(0)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    shape = (G, C) if G > 1 else (C,)
    rm_c, rv_c = torch.zeros(shape), torch.ones(shape)
    rm_g, rv_g = rm_c.cuda(), rv_c.cuda()
    alpha_c, alpha_g = torch.tensor(1.0), torch.tensor(1.0, device="cuda")
    for k, a in enumerate(ALPHAS + [0.5, 0.9]):
        alpha_c.fill_(a)
        alpha_g.fill_(a)
        x = _inputs(V, G, n, C, (14, 14), k, torch.bfloat16, channels_last=True)
        with torch.no_grad():
            want = _run_shared(x, V, G, rm_c, rv_c, alpha_c, w, b)
            got = FB.momentum_bn_train_fused(x.cuda(), V, G, rm_g, rv_g, alpha_g, w.cuda(),
                                             b.cuda(), 1e-5)
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(rm_g.cpu(), rm_c, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rv_g.cpu(), rv_c, atol=1e-4, rtol=1e-4)


@cuda
def test_cuda_compiled_teacher_over_alpha_and_batch_size_equals_eager_fused():
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    eager, compiled_net = _small_teacher().cuda(), _small_teacher().cuda()
    counter = CompileCounterWithBackend("inductor")
    dynamo.reset()
    compiled = torch.compile(compiled_net, backend=counter, fullgraph=True)
    for k, (n, a) in enumerate([(8, 1.0), (8, 0.5), (8, 0.2), (12, 0.1), (10, 0.05)]):
        for net in (eager, compiled_net):
            for m in net.modules():
                if isinstance(m, MomentumBatchNorm):
                    m.set_alpha(a)
        x = torch.randn(2 * n, 3, 6, 6, device="cuda") + k
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=1e-4)
        if k == 2:
            assert counter.frame_count == 1
    assert counter.frame_count <= 2
    for m, r in zip(eager.modules(), compiled_net.modules()):
        if isinstance(m, MomentumBatchNorm):
            torch.testing.assert_close(m.running_var, r.running_var, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- registered kernels
# The real ops (torch.batch_norm_update_stats / batch_norm_elemt) with CPU kernels registered
# for the test only (tests/cpu_bn_kernels.py): the fused path as it runs on CUDA, and
# torch.compile over it.
import torch.nn as nn  # noqa: E402

from m2_pretrain.layers import MomentumBatchNorm  # noqa: E402
from m2_pretrain.layers.momentum_bn import MomentumBatchNormAct2d  # noqa: E402

from cpu_bn_kernels import cpu_bn_kernels  # noqa: E402


@pytest.fixture
def kernels():
    with cpu_bn_kernels() as calls:
        yield calls
    assert not FB.fused_kernels_available(torch.zeros(1, 1))  # removed again


def test_registered_kernels_hold_the_cuda_contract(kernels):
    x = torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert FB.fused_kernels_available(x)
    mean, var = torch.batch_norm_update_stats(x.bfloat16(), None, None, 0.0)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (4,)  # not bf16
    want_var = torch.var(x.bfloat16().double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(var.double(), want_var, atol=1e-6, rtol=1e-6)
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    invstd = torch.rsqrt(var + 1e-5)
    y = torch.batch_norm_elemt(x, None, None, mean, invstd, 1e-5)
    assert y.stride() == x.stride()
    want = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="fp32 1-D contiguous"):
        torch.batch_norm_elemt(x, None, None, mean.double(), invstd, 1e-5)
    with pytest.raises(RuntimeError, match="fp32 1-D contiguous"):
        torch.batch_norm_elemt(x, None, None, torch.zeros(4, 2)[:, 0], invstd, 1e-5)
    with pytest.raises(RuntimeError, match="strides"):
        torch.batch_norm_elemt(x, None, None, mean, invstd, 1e-5,
                               out=torch.empty_like(x.contiguous()))
    with pytest.raises(RuntimeError, match="strides"):
        torch.batch_norm_elemt(x, None, None, mean, invstd, 1e-5,
                               out=torch.empty_like(x, dtype=torch.bfloat16))
    with pytest.raises(NotImplementedError, match="without running statistics"):
        torch.batch_norm_update_stats(x, torch.zeros(4), torch.ones(4), 0.1)
    assert kernels["stats"] == 2 and kernels["elemt"] == 1


@pytest.mark.parametrize("V,G,spatial,dtype,channels_last", [
    (2, 1, (4, 4), torch.float32, False),
    (2, 3, (4, 4), torch.float32, True),
    (2, 1, (), torch.float32, False),
    (1, 1, (3, 5), torch.float32, False),
    (2, 2, (4, 4), torch.bfloat16, True),
])
def test_fused_entry_with_real_ops_equals_plain(kernels, V, G, spatial, dtype, channels_last):
    C, n, eps = 5, 3, 1e-5
    w, b, rm, rv, rm_ref, rv_ref, alpha = _fresh_state(G, C)
    for k, a in enumerate(ALPHAS):
        alpha.fill_(a)
        x = _inputs(V, G, n, C, spatial, k, dtype, channels_last)
        with torch.no_grad():
            y = FB.momentum_bn_train_fused(x, V, G, rm, rv, alpha, w, b, eps)
        want = plain_momentum_bn(x, V, G, rm_ref, rv_ref, a, w, b, eps)
        assert y.dtype == dtype and y.stride() == x.stride()
        tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y.double(), want, **tol)
        torch.testing.assert_close(rm.view(G, C).double(), rm_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rv.view(G, C).double(), rv_ref, atol=1e-5, rtol=1e-5)
    assert kernels["stats"] == kernels["elemt"] == V * G * len(ALPHAS)


def test_fp64_input_takes_the_composite(kernels):
    V, G, C = 2, 2, 3
    w, b, rm, rv, rm_ref, rv_ref, alpha = _fresh_state(G, C)
    alpha.fill_(0.6)
    x = _inputs(V, G, 3, C, (2, 2), 1, torch.float64)
    with torch.no_grad():
        y = FB.momentum_bn_train_fused(x, V, G, rm, rv, alpha, w, b, 1e-5)
    assert kernels["stats"] == kernels["elemt"] == 0 and y.dtype == torch.float64
    want = plain_momentum_bn(x, V, G, rm_ref, rv_ref, 0.6, w, b, 1e-5)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("V,G,spatial,channels_last", [
    (2, 1, (4, 4), False), (2, 3, (4, 4), True), (2, 2, (), False), (1, 1, (3, 5), False)])
def test_cpu_fp32_takes_the_native_cpu_kernels_and_equals_plain(monkeypatch, V, G, spatial,
                                                                 channels_last):
    """Without registered kernels, an fp32 CPU forward without gradient runs the fast path on
    the CPU's own ``batch_norm_update_stats`` and native inference batch norm (one statistics
    and one normalising pass per slice), equal to the fp64 loop over iterations with a
    changing α; bf16 takes the composite (the CPU statistics kernel would keep bf16)."""
    assert not FB.fused_kernels_available(torch.zeros(1))
    calls = {"elemt": 0, "composite": 0}
    elemt, composite = FB.batch_norm_elemt_cpu, FB.momentum_bn_train_composite

    def counted_elemt(*a, **kw):
        calls["elemt"] += 1
        return elemt(*a, **kw)

    def counted_composite(*a, **kw):
        calls["composite"] += 1
        return composite(*a, **kw)

    monkeypatch.setattr(FB, "batch_norm_elemt_cpu", counted_elemt)
    monkeypatch.setattr(FB, "momentum_bn_train_composite", counted_composite)
    C = 5
    w, b, rm, rv, rm_ref, rv_ref, alpha = _fresh_state(G, C)
    for k, a in enumerate((1.0, 0.7, 0.2)):
        alpha.fill_(a)
        x = _inputs(V, G, 4, C, spatial, k, channels_last=channels_last)
        with torch.no_grad():
            y = FB.momentum_bn_train_fused(x, V, G, rm, rv, alpha, w, b, 1e-5)
        want = plain_momentum_bn(x, V, G, rm_ref, rv_ref, a, w, b, 1e-5)
        torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(rm.view(G, C).double(), rm_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rv.view(G, C).double(), rv_ref, atol=1e-5, rtol=1e-6)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                               else torch.contiguous_format)
    # the first call's self-check runs the composite once beside the fast path
    assert calls == {"elemt": 3 * V * G, "composite": 1}
    with torch.no_grad():
        FB.momentum_bn_train_fused(x.bfloat16(), V, G, rm, rv, alpha, w, b, 1e-5)
    assert calls == {"elemt": 3 * V * G, "composite": 2}


class PlainLayer(nn.Module):
    """Oracle module: ``plain_momentum_bn`` (fp64 loop) with its own fp64 running statistics."""

    def __init__(self, m: MomentumBatchNorm) -> None:
        super().__init__()
        self.m, g, c = m, m.num_groups, m.num_features
        self.rm = m.running_mean.double().view(g, c).clone()
        self.rv = m.running_var.double().view(g, c).clone()

    def forward(self, x):
        m = self.m
        y = plain_momentum_bn(x.detach(), m.num_views, m.num_groups, self.rm, self.rv,
                              float(m.alpha), m.weight.detach(), m.bias.detach(), m.eps)
        return m.act(y.float()) if isinstance(m, MomentumBatchNormAct2d) else y.float()


def _small_teacher(V=2, G=1):
    torch.manual_seed(0)
    bn = dict(num_views=V, num_groups=G)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), MomentumBatchNormAct2d(6, act=nn.ReLU(), **bn),
        nn.Conv2d(6, 6, 3, padding=1), MomentumBatchNorm(6, **bn), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), MomentumBatchNorm(5, **bn))
    for m in net.modules():
        if isinstance(m, MomentumBatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return net.requires_grad_(False)


def _oracle(net):
    import copy

    ref = copy.deepcopy(net)
    for i, m in enumerate(ref):
        if isinstance(m, MomentumBatchNorm):
            ref[i] = PlainLayer(m)
    return ref


def test_module_fused_branch_equals_plain_and_compiles_over_alpha_and_batch_size(kernels):
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    eager, compiled_net = _small_teacher(), _small_teacher()
    ref_e, ref_c = _oracle(eager), _oracle(compiled_net)
    counter = CompileCounterWithBackend("aot_eager")
    dynamo.reset()
    compiled = torch.compile(compiled_net, backend=counter, fullgraph=True)
    # per view: a changed batch size, then another (not below the first: convolution's fake
    # kernel guards on the batch being at least its first size)
    batches = [8, 8, 8, 12, 12, 10]
    stats_calls = []
    for k, n in enumerate(batches):
        a = [1.0, 0.7, 0.3, 0.2, 0.1, 0.05][k]
        for net in (eager, compiled_net, ref_e, ref_c):
            for m in net.modules():
                if isinstance(m, MomentumBatchNorm):
                    m.set_alpha(a)
        x = torch.randn(2 * n, 3, 6, 6, generator=torch.Generator().manual_seed(k)) * 2 + k
        before = kernels["stats"]
        with torch.no_grad():
            y_e = eager(x)
            stats_calls.append(kernels["stats"] - before)
            y_c = compiled(x)
        assert kernels["stats"] - before == stats_calls[-1]  # compiled: composite, no kernel
        want_e, want_c = ref_e(x), ref_c(x)
        torch.testing.assert_close(y_e, want_e, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y_c, want_c, atol=1e-4, rtol=1e-4)
        for net, ref in ((eager, ref_e), (compiled_net, ref_c)):
            for m, r in zip(net, ref):
                if isinstance(m, MomentumBatchNorm):
                    torch.testing.assert_close(m.running_var.double().view_as(r.rv), r.rv,
                                               atol=1e-5, rtol=1e-5)
        if k == 2:
            assert counter.frame_count == 1  # three alphas, one graph
    assert stats_calls == [6] * len(batches)  # eager: the fused kernels, 2 views x 3 layers
    assert counter.frame_count <= 2  # the batch sizes cost at most one recompile


def test_fused_layer_ops_per_forward():
    """2 kernels per (view, group) slice plus 7 small ops (one of them an allocation)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from op_count import launches_and_allocations, momentum_bn_ops

    for g in (1, 4):
        ops = momentum_bn_ops(g)
        assert ops["batch_norm_update_stats"] == ops["batch_norm_elemt"] == 2 * g
        assert launches_and_allocations(ops) == (4 * g + 6, 1), ops

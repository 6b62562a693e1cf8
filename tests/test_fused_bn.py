"""Momentum BN at plain-BN cost: the shared (V, G, C) math with CPU stand-ins of the CUDA
kernels, against an independent plain implementation; the CUDA path (skipped without a GPU)."""

import pytest
import torch

from m2_pretrain.layers import fused_bn as FB

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


def _run_shared(x, V, G, rm, rv, alpha, w, b):
    return FB.momentum_bn_train(x, V, G, rm, rv, alpha, w, b, 1e-5,
                                FB.batch_norm_stats_cpu, FB.batch_norm_elemt_cpu)


@pytest.mark.parametrize("V,G,spatial,dtype,channels_last", [
    (2, 2, (4, 4), torch.float32, False),
    (2, 3, (4, 4), torch.float32, True),
    (2, 1, (), torch.float32, False),  # (B, C) input of the projector's BatchNorm1d
    (1, 2, (3, 5), torch.float32, False),  # MoCo's key encoder: one view
    (2, 2, (4, 4), torch.bfloat16, True),
])
def test_shared_math_equals_plain_over_iterations(V, G, spatial, dtype, channels_last):
    C, n, eps = 5, 3, 1e-5
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm = torch.zeros(G, C) if G > 1 else torch.zeros(C)
    rv = torch.ones_like(rm)
    rm_ref, rv_ref = torch.zeros(G, C, dtype=torch.float64), torch.ones(G, C, dtype=torch.float64)
    alpha = torch.tensor(1.0)
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


def test_variance_from_invstd_is_exact_and_handles_zero():
    var = torch.tensor([0.0, 1e-12, 1e-3, 1.0, 1e4])
    invstd = torch.where(var > 0, torch.rsqrt(var), torch.zeros_like(var))
    got = FB.var_from_invstd(invstd)
    assert got[0] == 0
    torch.testing.assert_close(got, var, rtol=1e-6, atol=0)
    # the eps-subtracting alternative gets a small variance badly wrong (cancellation)
    lossy = torch.rsqrt(var + 1e-5).reciprocal().square() - 1e-5
    assert (lossy[1] - var[1]).abs() / var[1] > 0.1


def test_shape_errors_name_the_problem():
    x = torch.randn(6, 3, 2, 2)
    with pytest.raises(ValueError, match="2 views x 2 groups"):
        _run_shared(x, 2, 2, torch.zeros(2, 3), torch.ones(2, 3), torch.tensor(1.0), None, None)
    with pytest.raises(ValueError, match="running statistics"):
        _run_shared(x, 2, 3, torch.zeros(3), torch.ones(3), torch.tensor(1.0), None, None)


def test_compiled_shared_math_no_graph_break_no_recompile_when_alpha_changes():
    import torch._dynamo as dynamo

    V, G, C = 2, 2, 4
    fn = torch.compile(_run_shared, backend="aot_eager", fullgraph=True)
    rm, rv = torch.zeros(G, C), torch.ones(G, C)
    rm_e, rv_e = rm.clone(), rv.clone()
    alpha = torch.tensor(1.0)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    dynamo.reset()
    with dynamo.config.patch(error_on_recompile=True):
        for k, a in enumerate(ALPHAS):
            alpha.fill_(a)
            x = _inputs(V, G, 3, C, (3, 3), k)
            y = fn(x, V, G, rm, rv, alpha, w, b)
            want = _run_shared(x, V, G, rm_e, rv_e, alpha, w, b)
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rm, rm_e, atol=1e-6, rtol=1e-6)
    # and a fresh alpha tensor with another value is a new input value, not a new graph
    with dynamo.config.patch(error_on_recompile=True):
        fn(_inputs(V, G, 3, C, (3, 3), 9), V, G, rm, rv, torch.tensor(0.123), w, b)


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
def test_cuda_fused_compiles_without_recompiling_for_alpha():
    import torch._dynamo as dynamo

    V, G, C = 2, 2, 32
    rm, rv = torch.zeros(G, C, device="cuda"), torch.ones(G, C, device="cuda")
    w, b = torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
    alpha = torch.tensor(1.0, device="cuda")
    fn = torch.compile(FB.momentum_bn_train_fused)
    dynamo.reset()
    with dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for a in ALPHAS:
            alpha.fill_(a)
            x = torch.randn(V * G * 4, C, 8, 8, device="cuda", dtype=torch.bfloat16)
            y = fn(x, V, G, rm, rv, alpha, w, b, 1e-5)
            assert torch.isfinite(y.float()).all()

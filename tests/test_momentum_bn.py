"""Momentum BN against an independent, deliberately plain implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from m2_pretrain.layers import MomentumBatchNorm
from m2_pretrain.models.schedules import momentum_bn_alpha


class PlainMomentumBN:
    """Reference semantics written as plainly as possible: each view in its own call, the mean
    and the (biased) variance in separate passes, the lazy update done by hand at the end."""

    def __init__(self, c, weight, bias, eps=1e-5):
        self.mean = torch.zeros(c, dtype=torch.float64)
        self.var = torch.ones(c, dtype=torch.float64)
        self.w, self.b, self.eps = weight.double(), bias.double(), eps

    @staticmethod
    def _bshape(x):
        return (1, -1) + (1,) * (x.dim() - 2)

    def view_forward(self, x, alpha):
        x = x.double()
        dims = [0] + list(range(2, x.dim()))
        mu = x.mean(dim=dims)
        var = ((x - mu.view(self._bshape(x))) ** 2).mean(dim=dims)
        m = alpha * mu + (1 - alpha) * self.mean
        v = alpha * var + (1 - alpha) * self.var
        s = self._bshape(x)
        y = (x - m.view(s)) / torch.sqrt(v.view(s) + self.eps) * self.w.view(s) + self.b.view(s)
        return y, mu, var

    def step(self, views, alpha):
        outs, mus, vars_ = [], [], []
        for x in views:
            y, mu, var = self.view_forward(x, alpha)
            outs.append(y)
            mus.append(mu)
            vars_.append(var)
        self.mean = alpha * (sum(mus) / len(mus)) + (1 - alpha) * self.mean
        self.var = alpha * (sum(vars_) / len(vars_)) + (1 - alpha) * self.var
        return outs


def _layer(c, num_views=2):
    layer = MomentumBatchNorm(c, num_views=num_views)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c) + 0.5)
        layer.bias.copy_(torch.randn(c))
    return layer


@pytest.mark.parametrize("shape", [(8, 6), (8, 6, 5), (8, 6, 5, 7)])
def test_matches_plain_reference_over_iterations(shape):
    c = shape[1]
    layer = _layer(c)
    ref = PlainMomentumBN(c, layer.weight.detach(), layer.bias.detach())
    total = 7
    for k in range(total):
        alpha = momentum_bn_alpha(k, total)
        # each view with a different distribution, shifting over iterations
        v1 = torch.randn(shape) * 2.0 + k
        v2 = torch.randn(shape) * 0.5 + 0.5 * k
        layer.set_alpha(alpha)
        y = layer(torch.cat([v1, v2]))
        r1, r2 = ref.step([v1, v2], alpha)
        torch.testing.assert_close(y[: shape[0]].double(), r1, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(y[shape[0] :].double(), r2, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_mean.double(), ref.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), ref.var, atol=1e-5, rtol=1e-5)
    assert int(layer.num_batches_tracked) == total
    # the running statistics really moved away from their initial values
    assert layer.running_mean.abs().max() > 0.5


def test_views_do_not_see_each_other():
    """Changing view 2 must not change view 1's output (per-view statistics)."""
    layer = _layer(4)
    layer.set_alpha(0.7)
    v1 = torch.randn(6, 4, 3, 3)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    y_a = layer(torch.cat([v1, torch.randn(6, 4, 3, 3)]))[:6]
    layer.load_state_dict(state)
    y_b = layer(torch.cat([v1, 10 + 5 * torch.randn(6, 4, 3, 3)]))[:6]
    torch.testing.assert_close(y_a, y_b)


def test_matches_reference_under_cpu_autocast():
    c, shape = 5, (6, 5, 4, 4)
    layer = _layer(c)
    conv = torch.nn.Conv2d(3, c, 3, padding=1)
    ref = PlainMomentumBN(c, layer.weight.detach(), layer.bias.detach())
    total = 5
    for k in range(total):
        alpha = momentum_bn_alpha(k, total)
        inp = torch.randn(2 * shape[0], 3, 4, 4) + k
        layer.set_alpha(alpha)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = conv(inp)
            assert x.dtype == torch.bfloat16
            y = layer(x)
        assert y.dtype == torch.bfloat16
        assert layer.running_mean.dtype == torch.float32 and layer.alpha.dtype == torch.float32
        r1, r2 = ref.step([x[: shape[0]].detach(), x[shape[0] :].detach()], alpha)
        torch.testing.assert_close(y.double(), torch.cat([r1, r2]), atol=0.05, rtol=0.02)
        # statistics are fp32 from the bf16 input: tight agreement with the float64 reference
        torch.testing.assert_close(layer.running_mean.double(), ref.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), ref.var, atol=1e-5, rtol=1e-5)


def test_alpha_one_is_per_view_batch_norm():
    layer = _layer(3)
    layer.set_alpha(1.0)
    v1, v2 = torch.randn(5, 3, 4, 4) * 3, torch.randn(5, 3, 4, 4) + 2
    y = layer(torch.cat([v1, v2]))
    for x, out in ((v1, y[:5]), (v2, y[5:])):
        expected = F.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=1e-5)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_alpha_zero_uses_running_stats_only():
    layer = _layer(3)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        layer.running_var.copy_(torch.tensor([4.0, 0.25, 1.5]))
    before = (layer.running_mean.clone(), layer.running_var.clone())
    layer.set_alpha(0.0)
    x = torch.randn(10, 3, 4, 4) * 7 + 3
    y = layer(x)
    expected = F.batch_norm(
        x, before[0], before[1], layer.weight, layer.bias, training=False, eps=1e-5
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean, before[0])
    torch.testing.assert_close(layer.running_var, before[1])


def test_eval_mode_uses_running_stats_and_does_not_update():
    layer = _layer(3)
    layer(torch.randn(8, 3, 2, 2) + 4)  # alpha=1: running stats become the batch stats
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    layer.eval()
    x = torch.randn(3, 3, 2, 2)  # odd batch is fine in eval mode
    expected = F.batch_norm(x, rm, rv, layer.weight, layer.bias, training=False, eps=1e-5)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.running_mean, rm)


def test_state_dict_round_trip_gives_identical_next_output():
    layer = _layer(4)
    for k in range(3):
        layer.set_alpha(momentum_bn_alpha(k, 10))
        layer(torch.randn(6, 4, 3, 3) + k)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "alpha"}
    fresh = MomentumBatchNorm(4, num_views=2)
    fresh.load_state_dict(sd)
    assert math.isclose(float(fresh.alpha), momentum_bn_alpha(2, 10), rel_tol=1e-6)
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh.running_var, layer.running_var, rtol=0, atol=0)


def test_bad_inputs_raise():
    layer = _layer(4, num_views=2)
    with pytest.raises(ValueError, match="not divisible into 2 views"):
        layer(torch.randn(5, 4, 2, 2))
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(6, 3, 2, 2))


def _inductor_kernels(module, x):
    """(kernels, extern calls) in the code inductor generates for ``module(x)`` (CPU, not
    compiled to machine code)."""
    import re

    import torch._dynamo as dynamo
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import get_code

    dynamo.reset()
    # get_code skips the C++ compilation; the caches would want the compiled module
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False), torch.no_grad():
        codes = get_code(torch.compile(module, fullgraph=True), x)
    call = "\n".join(c[c.index("def call("):] for c in codes if "def call(" in c)
    assert call, codes
    return len(re.findall(r"^\s+cpp_fused_\w+\(", call, re.M)), call.count("extern_kernels."), call


def test_compiled_teacher_block_fuses_like_plain_bn():
    """Under torch.compile the layer uses its composite math (the fused CUDA ops have no fake
    kernels), which inductor fuses with the activation: no more kernels than plain BN + ReLU,
    even where the fused path's ops have kernels (registered here on CPU)."""
    from m2_pretrain.layers.momentum_bn import MomentumBatchNormAct2d

    from cpu_bn_kernels import cpu_bn_kernels

    x = torch.randn(16, 8, 6, 6)
    plain = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.ReLU()).requires_grad_(False)
    mbn = MomentumBatchNormAct2d(8, num_views=2, num_groups=2, act=torch.nn.ReLU())
    mbn.requires_grad_(False)
    k_plain, e_plain, _ = _inductor_kernels(plain, x)
    with cpu_bn_kernels() as calls:
        k_mbn, e_mbn, code = _inductor_kernels(mbn, x)
    assert calls["stats"] == calls["elemt"] == 0 and "batch_norm" not in code
    assert k_plain >= 1 and k_mbn + e_mbn <= k_plain + e_plain, (k_mbn, e_mbn, k_plain, e_plain)

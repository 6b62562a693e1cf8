"""BN conversion of timm models and the M2 Teacher module (EMA, gradients, norm switch)."""

import copy
from collections import OrderedDict

import pytest
import timm
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from m2_pretrain.layers import (
    MomentumBatchNormAct2d,
    convert_momentum_bn,
    count_plain_bn,
    momentum_bn_modules,
)
from m2_pretrain.models import M2Teacher


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_convert_timm_model_leaves_no_plain_bn(arch):
    model = timm.create_model(arch, num_classes=0, pretrained=False)
    _randomise_bn(model)
    n_bn = sum(isinstance(m, _BatchNorm) for m in model.modules())
    assert n_bn > 10
    ref = copy.deepcopy(model).eval()
    convert_momentum_bn(model, num_views=2)
    assert count_plain_bn(model) == 0
    assert len(momentum_bn_modules(model)) == n_bn
    # state dict keys are the plain model's plus one alpha per layer
    keys, ref_keys = set(model.state_dict()), set(ref.state_dict())
    assert ref_keys <= keys
    assert {k for k in keys - ref_keys} == {k for k in keys if k.endswith(".alpha")}
    # eval mode normalises with the copied running stats: same function as the original
    # (this fails if BatchNormAct2d's activation were dropped or affine params not copied)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


def test_convert_keeps_batchnormact_activation():
    model = timm.create_model("efficientnet_b0", num_classes=0, pretrained=False)
    acts = [type(m.act) for m in model.modules() if isinstance(m, timm.layers.BatchNormAct2d)]
    convert_momentum_bn(model)
    new_acts = [type(m.act) for m in model.modules() if isinstance(m, MomentumBatchNormAct2d)]
    assert new_acts == acts and torch.nn.SiLU in acts


def _tiny_model(teacher_norm="momentum"):
    return M2Teacher("resnet18", proj_hidden=32, proj_out=16, pred_hidden=32, teacher_norm=teacher_norm)


def test_no_gradient_reaches_teacher():
    model = _tiny_model()
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = model(v1, v2)["loss"]
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    student_grads = [p.grad for p in model.student.parameters()]
    assert all(g is not None for g in student_grads)
    assert sum(g.abs().sum() for g in student_grads) > 0
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_ema_pairs_by_name_not_by_order():
    model = _tiny_model()
    assert not any(n.startswith("predictor") for n in model._ema.names)
    # reverse the registration order of the teacher's submodules: zip order would now pair
    # the encoder with the projector, pairing by name must not care
    model.teacher._modules = OrderedDict(reversed(list(model.teacher._modules.items())))
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.zero_()
        for p in model.student.parameters():
            p.normal_()
    buffers_before = {k: v.clone() for k, v in model.teacher.named_buffers()}
    model.update_teacher(0.25)
    s = dict(model.student.named_parameters())
    for name, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, 0.25 * s[name])
    # BN buffers of the teacher (Momentum BN running stats, alpha) are not touched by the EMA
    for k, v in model.teacher.named_buffers():
        torch.testing.assert_close(v, buffers_before[k], rtol=0, atol=0)


def test_ema_is_interpolation():
    model = _tiny_model()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    t0 = {n: p.clone() for n, p in model.teacher.named_parameters()}
    s = dict(model.student.named_parameters())
    model.update_teacher(0.1)
    for n, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * t0[n] + 0.1 * s[n])


def test_teacher_norm_switch():
    m = _tiny_model("momentum")
    assert count_plain_bn(m.teacher) == 0 and len(momentum_bn_modules(m.teacher)) > 0
    assert count_plain_bn(m.student) > 0 and not momentum_bn_modules(m.student)
    b = _tiny_model("bn")
    assert not momentum_bn_modules(b.teacher) and count_plain_bn(b.teacher) > 0
    with pytest.raises(ValueError, match="teacher_norm"):
        _tiny_model("syncbn")


def test_fused_teacher_equals_per_view_calls_at_alpha_one():
    """The teacher forwards [v1; v2] as one batch; at alpha=1 that must equal running each view
    on its own through plain train-mode BN (which is also what the 'bn' teacher does)."""
    m = _tiny_model("momentum")
    b = _tiny_model("bn")
    b.teacher.load_state_dict(
        {k: v for k, v in m.teacher.state_dict().items() if not k.endswith("alpha")}
    )
    m.set_alpha(1.0)
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) * 2
    z1, z2 = m.teacher_targets(v1, v2)
    r1, r2 = b.teacher_targets(v1, v2)
    torch.testing.assert_close(z1, r1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z2, r2, atol=1e-4, rtol=1e-4)


def test_training_reduces_loss_on_fixed_batch():
    m = _tiny_model()
    opt = torch.optim.SGD(list(m.student.parameters()) + list(m.predictor.parameters()), lr=0.05, momentum=0.9)
    v1, v2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    losses = []
    for k in range(15):
        m.set_alpha(1.0 - k / 15)
        loss = m(v1, v2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_teacher(0.01)
        losses.append(loss.item())
    assert 0.0 <= min(losses) and max(losses) <= 8.0
    assert losses[-1] < losses[0]

"""MoCo v2 with shuffle BN / Momentum BN / BN key encoders."""

import copy

import torch
import torch.nn.functional as F

from m2_pretrain.checkpoint import list_checkpoints, safe_load
from m2_pretrain.engine.trainer import Trainer
from m2_pretrain.export import export_encoder
from m2_pretrain.layers import count_plain_bn, momentum_bn_modules
from m2_pretrain.models.mocov2 import MoCoV2

from helpers import stop_after_step, tiny_config


def _moco(key_norm="shuffle_bn", queue=32, splits=2):
    return MoCoV2("resnet10t", dim=8, hidden=16, queue_size=queue, key_norm=key_norm,
                  shuffle_splits=splits)


def test_queue_update_order_and_size():
    m = _moco(queue=10)
    k1 = F.normalize(torch.randn(4, 8), dim=1)
    k2 = F.normalize(torch.randn(4, 8), dim=1)
    k3 = F.normalize(torch.randn(4, 8), dim=1)
    old = m.queue.clone()
    m.enqueue(k1)
    assert m.queue.shape == (10, 8) and int(m.queue_ptr) == 4
    torch.testing.assert_close(m.queue[:4], k1)
    torch.testing.assert_close(m.queue[4:], old[4:])
    m.enqueue(k2)
    m.enqueue(k3)  # wraps around: 8, 9, 0, 1
    torch.testing.assert_close(m.queue[4:8], k2)
    torch.testing.assert_close(m.queue[8:10], k3[:2])
    torch.testing.assert_close(m.queue[0:2], k3[2:])
    torch.testing.assert_close(m.queue[2:4], k1[2:])
    assert int(m.queue_ptr) == 2 and m.queue.dtype == torch.float32


def test_forward_enqueues_keys_and_key_encoder_gets_no_gradient():
    m = _moco("momentum")
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = m(v1, v2)
    out["loss"].backward()
    assert int(m.queue_ptr) == 4
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert all(p.grad is not None for p in m.student.parameters())
    assert out["accuracy"].shape == () and 0.0 <= float(out["accuracy"]) <= 1.0


def test_shuffle_bn_single_process_equals_per_sub_batch_bn():
    m = _moco("shuffle_bn", splits=3)
    x = torch.randn(9, 3, 32, 32)
    ref_model = copy.deepcopy(m.teacher)
    torch.manual_seed(123)
    k = m.keys(x)
    torch.manual_seed(123)
    perm = torch.randperm(9)
    chunks = torch.tensor_split(x[perm], 3)
    ref = torch.cat([ref_model(c) for c in chunks])[torch.argsort(perm)]
    torch.testing.assert_close(k, F.normalize(ref, dim=1))
    # rows come back in the original order: each row is its own image's key up to BN stats, so
    # with one split (whole-batch BN) it equals the unshuffled forward exactly
    m1 = _moco("shuffle_bn", splits=1)
    m1.teacher.load_state_dict(m.teacher.state_dict())
    plain = copy.deepcopy(m1.teacher)
    torch.testing.assert_close(m1.keys(x), F.normalize(plain(x), dim=1), atol=1e-5, rtol=1e-5)
    # and sub-batch statistics really differ from whole-batch ones
    assert not torch.allclose(k, m1.keys(x), atol=1e-4)


class PlainFixedAlphaBN:
    """Reference: Momentum BN with fixed alpha on a single view, written plainly."""

    def __init__(self, c, alpha):
        self.mean, self.var, self.alpha = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64), alpha

    def __call__(self, x, w, b, eps=1e-5):
        x = x.double()
        mu = x.mean(dim=(0, 2, 3))
        var = ((x - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        m = self.alpha * mu + (1 - self.alpha) * self.mean
        v = self.alpha * var + (1 - self.alpha) * self.var
        y = (x - m.view(1, -1, 1, 1)) / torch.sqrt(v.view(1, -1, 1, 1) + eps) * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
        self.mean = self.alpha * mu + (1 - self.alpha) * self.mean
        self.var = self.alpha * var + (1 - self.alpha) * self.var
        return y


def test_momentum_key_encoder_fixed_alpha_matches_reference():
    m = _moco("momentum")
    assert count_plain_bn(m.teacher) == 0
    layers = momentum_bn_modules(m.teacher)
    assert layers and all(abs(float(l.alpha) - 0.064) < 1e-7 and l.num_views == 1 for l in layers)
    m.set_alpha(1.0)  # the M2 schedule must not touch MoCo's fixed alpha
    assert all(abs(float(l.alpha) - 0.064) < 1e-7 for l in layers)
    layer = layers[0]
    ref = PlainFixedAlphaBN(layer.num_features, 0.064)
    for step in range(4):
        x = torch.randn(6, layer.num_features, 5, 5) * (step + 1) + step
        y = layer(x)
        torch.testing.assert_close(y.double(), ref(x, layer.weight.detach(), layer.bias.detach()), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean.double(), ref.mean, atol=1e-5, rtol=1e-5)


def moco_cfg(**train):
    return tiny_config(model={"method": "mocov2", "arch": "resnet10t", "moco_dim": 16,
                              "moco_hidden": 32, "moco_queue": 32, "key_norm": "momentum"},
                       train={"m_schedule": "constant", "m_base": 0.01, **train},
                       optim={"base_lr": 0.004})


def test_short_run_lowers_infonce_and_resume_restores_queue(tmp_path):
    cfg = moco_cfg(max_steps=96, log_every=8)
    cfg.checkpoint.every_steps = 48
    t = Trainer(cfg, tmp_path / "a", progress=False)
    res = t.fit()
    losses = [r["loss"] for r in res["history"]]
    # The loss first rises while the queue fills with real keys (its random initial entries are
    # easy negatives), then falls: compare the end with the peak after the queue is full.
    assert sum(losses[-3:]) / 3 < max(losses[1:]) - 0.15, losses
    ck = safe_load(list_checkpoints(tmp_path / "a")[-1])
    torch.testing.assert_close(ck["extra"]["queue"], t.model.queue, rtol=0, atol=0)
    assert int(ck["extra"]["queue_ptr"]) == int(t.model.queue_ptr)
    # resume restores the queue exactly
    t2 = Trainer(cfg, tmp_path / "a", resume=True, progress=False)
    torch.testing.assert_close(t2.model.queue, t.model.queue, rtol=0, atol=0)
    assert int(t2.model.queue_ptr) == int(t.model.queue_ptr) == (96 * 8) % 32
    # export defaults to the query encoder for MoCo
    meta = export_encoder(list_checkpoints(tmp_path / "a")[-1], tmp_path / "enc.pth")
    assert meta["which"] == "student" and meta["method"] == "mocov2"


def test_moco_resume_is_exact(tmp_path):
    cfg = moco_cfg(max_steps=4)
    full = Trainer(cfg, tmp_path / "full", progress=False).fit()
    cfg2 = moco_cfg(max_steps=4)
    t = Trainer(cfg2, tmp_path / "part", progress=False)
    t.total_steps = 4
    stop_after_step(t, 1)  # run two steps, stop through the signal flag, resume
    part = t.fit()
    assert part["step"] == 2
    rest = Trainer(cfg2, tmp_path / "part", resume=True, progress=False).fit()
    got = [r["loss"] for r in part["history"] + rest["history"]]
    want = [r["loss"] for r in full["history"]]
    assert got == want

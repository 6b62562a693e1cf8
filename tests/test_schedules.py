import math

import pytest

from m2_pretrain.models import schedules as S


def test_cosine_end_points_and_monotonic():
    K = 100
    for fn, base in ((S.ema_one_minus_m, 0.032), (S.momentum_bn_alpha, 1.0)):
        vals = [fn(k, K, base) for k in range(K + 1)]
        assert vals[0] == pytest.approx(base)
        assert vals[-1] == pytest.approx(0.0, abs=1e-12)
        assert vals[K // 2] == pytest.approx(base / 2)
        assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert S.ema_momentum(0, K, 0.01) == pytest.approx(0.99)
    assert S.ema_momentum(K, K, 0.01) == pytest.approx(1.0)


def test_learning_rate_warmup_then_cosine():
    K, W, lr = 1000, 100, 0.4
    vals = [S.learning_rate(k, K, lr, warmup_steps=W, warmup_factor=0.001) for k in range(K + 1)]
    assert vals[0] == pytest.approx(0.001 * lr)
    assert vals[W] == pytest.approx(lr)
    assert vals[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(vals[:W], vals[1 : W + 1]))
    assert all(a >= b for a, b in zip(vals[W:], vals[W + 1 :]))
    assert vals[W + (K - W) // 2] == pytest.approx(lr / 2)


def test_scaling_rules():
    assert S.scale_lr(0.05, 1024) == pytest.approx(0.2)
    assert S.scale_lr(0.1, 32 * 64) == pytest.approx(0.8)
    # batch x4 -> m_base x4 (paper Sec. 4.2)
    assert S.scale_m_base(0.01, 4096, 1024) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="outside"):
        S.scale_m_base(0.5, 4096, 1024)


def test_bad_steps_raise():
    with pytest.raises(ValueError):
        S.momentum_bn_alpha(11, 10)
    with pytest.raises(ValueError):
        S.learning_rate(0, 10, 0.1, warmup_steps=20)
    assert math.isfinite(S.learning_rate(10, 10, 0.1, warmup_steps=10))

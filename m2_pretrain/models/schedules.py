"""Schedules as pure functions of the step (k = current step, K = total steps)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from ..config import choose


def _check(step: int, total: int) -> None:
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    if not 0 <= step <= total:
        raise ValueError(f"step {step} outside [0, {total}]")


def cosine_decay(step: int, total: int, base: float, final: float = 0.0) -> float:
    """``final + (base - final) * (cos(pi k / K) + 1) / 2``: ``base`` at k=0, ``final`` at k=K."""
    _check(step, total)
    return final + (base - final) * (math.cos(math.pi * step / total) + 1.0) / 2.0


def ema_one_minus_m(step: int, total: int, m_base: float) -> float:
    """1 - m of the parameter EMA: m_base at the start, decaying to 0 (decay m goes to 1).

    The teacher update is ``xi <- m * xi + (1 - m) * theta`` (paper Eq. 7/8).
    """
    return cosine_decay(step, total, m_base)


def ema_momentum(step: int, total: int, m_base: float) -> float:
    """The EMA decay m = 1 - ema_one_minus_m(step, total, m_base)."""
    return 1.0 - ema_one_minus_m(step, total, m_base)


def constant_one_minus_m(step: int, total: int, m_base: float) -> float:
    """1 - m held at m_base (MoCo's fixed key-encoder momentum)."""
    _check(step, total)
    return m_base


# ``train.m_schedule`` -> ``(step, total, m_base) -> 1 - m``
EMA_SCHEDULES = {"cosine": ema_one_minus_m, "constant": constant_one_minus_m}


def momentum_bn_alpha(step: int, total: int, alpha_base: float = 1.0) -> float:
    """Momentum BN's weight of the current batch: alpha_base at k=0, cosine to 0 at k=K."""
    return cosine_decay(step, total, alpha_base)


def learning_rate(
    step: int,
    total: int,
    base_lr: float,
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
    final_lr: float = 0.0,
) -> float:
    """Linear warm-up from ``warmup_factor * base_lr`` to ``base_lr`` over ``warmup_steps``,
    then cosine decay to ``final_lr`` at ``total``."""
    _check(step, total)
    if warmup_steps > total:
        raise ValueError(f"warmup_steps {warmup_steps} exceeds total steps {total}")
    if step < warmup_steps:
        frac = step / warmup_steps
        return base_lr * (warmup_factor + (1.0 - warmup_factor) * frac)
    return cosine_decay(step - warmup_steps, max(total - warmup_steps, 1), base_lr, final_lr)


def scale_lr(base_lr: float, batch_size: int, reference_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al.): lr = base_lr * batch / reference_batch."""
    if batch_size <= 0 or reference_batch <= 0:
        raise ValueError("batch sizes must be positive")
    return base_lr * batch_size / reference_batch


def scale_m_base(m_base: float, batch_size: int, reference_batch: int) -> float:
    """The paper's momentum equivalence rule (Sec. 4.2): when the batch is multiplied by k,
    multiply the learning rate by k *and* m_base (the initial 1 - m) by k."""
    if batch_size <= 0 or reference_batch <= 0:
        raise ValueError("batch sizes must be positive")
    scaled = m_base * batch_size / reference_batch
    if not 0.0 <= scaled <= 1.0:
        raise ValueError(
            f"scaled m_base {scaled:.4g} is outside [0, 1]: batch {batch_size} is too large "
            f"for m_base {m_base} at reference batch {reference_batch}"
        )
    return scaled


class Schedule(NamedTuple):
    """The scheduled values of one optimizer step."""

    lr: float
    one_minus_m: float  # of the teacher's EMA
    alpha: float  # Momentum BN's weight of the current batch


@dataclass(frozen=True)
class RunSchedule:
    """Every schedule of one run (learning rate with warm-up, EMA ``1 - m``, Momentum BN alpha)
    as a function of the optimizer step, from ``cfg`` and the run's batch geometry: the
    learning rate and (with ``train.m_base_reference_batch``) ``m_base`` are scaled to the
    global batch ``batch_size x processes x accum_steps``."""

    total_steps: int
    warmup_steps: int
    global_batch: int
    base_lr: float
    m_base: float
    warmup_factor: float
    alpha_base: float
    m_schedule: str

    @classmethod
    def from_config(cls, cfg, steps_per_epoch: int, world_size: int) -> "RunSchedule":
        t, o = cfg.train, cfg.optim
        choose("train.m_schedule", t.m_schedule, EMA_SCHEDULES)
        total = t.max_steps if t.max_steps > 0 else max(int(round(t.epochs * steps_per_epoch)), 1)
        batch = t.batch_size * world_size * t.accum_steps
        m_base = t.m_base
        if t.m_base_reference_batch > 0:
            m_base = scale_m_base(t.m_base, batch, t.m_base_reference_batch)
        return cls(total, min(int(round(o.warmup_epochs * steps_per_epoch)), total), batch,
                   scale_lr(o.base_lr, batch, o.lr_reference_batch), m_base, o.warmup_factor,
                   cfg.model.alpha_base, t.m_schedule)

    def at(self, k: int) -> Schedule:
        lr = learning_rate(k, self.total_steps, self.base_lr, self.warmup_steps, self.warmup_factor)
        return Schedule(lr, EMA_SCHEDULES[self.m_schedule](k, self.total_steps, self.m_base),
                        momentum_bn_alpha(k, self.total_steps, self.alpha_base))

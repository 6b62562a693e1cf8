"""The training state's health: non-finite losses, and the divergence rule for weights and BN
statistics (checked when the trainer logs, checkpoints or stops, and on every checkpoint
``--resume`` considers)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the broken state is not saved, and the message names the
    checkpoint to go back to."""


class DivergedStateError(NonFiniteLossError):
    """A weight or BN statistic became NaN/inf or diverged (see :data:`DIVERGENCE_GROWTH`)
    while the (bounded) loss stayed finite; the broken state is not saved."""


# The divergence rule, checked whenever the trainer logs, checkpoints or stops (one fused norm
# and one host sync, nothing per step), and on every checkpoint ``--resume`` considers. The
# state has diverged when
# - a floating-point parameter or buffer holds NaN/inf, or one tensor's L2 norm exceeds
#   DIVERGED_NORM;
# - the L2 norm of all parameters together exceeds DIVERGENCE_GROWTH times its value at
#   initialisation (the freshly built model, also for a resumed run);
# - the L2 norm of all floating-point buffers together (BN running statistics, the MoCo queue)
#   exceeds STATISTICS_GROWTH times its value at initialisation. Running variances are second
#   moments: they grow as the square of the weights before a BN layer, whose scale BN hides
#   from the loss, so their limit is the square of the parameters' one.
# Healthy runs stay far inside. Measured (norm / norm at initialisation): the demo config
# (configs/pretrain/embedded_cpu.yaml) over its first 40 steps, parameters 1.0001 and
# statistics 0.6-0.76; the tests' 6-step ResNet-18 at lr 0.1 per 8 images, parameters 1.01 and
# statistics 11.6 (the stem's running variance follows its growing conv weights). A run whose
# loss sat at its upper bound reached a weight norm of 7.7e10 against a healthy ~30.
DIVERGED_NORM = 1e12
DIVERGENCE_GROWTH = 1e3
STATISTICS_GROWTH = DIVERGENCE_GROWTH**2


class StateGuard:
    """The divergence rule over ``model``'s parameters and floating-point buffers, with the
    norms of the freshly built model as reference (also for a resumed run)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        with torch.no_grad():
            _, params, _, buffers = self.named_state()
            _, p, b = self.norms(params, buffers)
        self.reference = (float(p), float(b))

    def named_state(self) -> tuple[list[str], list[torch.Tensor], list[str], list[torch.Tensor]]:
        """Names and tensors of the parameters, then of the floating-point buffers."""
        p = list(self.model.named_parameters())
        b = [(n, t) for n, t in self.model.named_buffers() if t.is_floating_point()]
        return [n for n, _ in p], [t for _, t in p], [n for n, _ in b], [t for _, t in b]

    @staticmethod
    def norms(params: list[torch.Tensor], buffers: list[torch.Tensor]):
        """Per-tensor L2 norms (parameters, then buffers) and the L2 norms of all parameters
        and of all buffers together, on the tensors' device (no host sync)."""
        device = (params + buffers)[0].device if params + buffers else torch.device("cpu")
        parts = []
        for group in (params, buffers):
            norms = [n.float() for n in torch._foreach_norm(group)] if group else []
            parts.append(torch.stack(norms) if norms else torch.zeros(0, device=device))
        return torch.cat(parts), parts[0].square().sum().sqrt(), parts[1].square().sum().sqrt()

    def _growth_limits(self, params, buffers):
        """(what, norm now, norm at initialisation, growth limit) of the divergence rule."""
        return (("parameter", params, self.reference[0], DIVERGENCE_GROWTH),
                ("buffer (BN statistics)", buffers, self.reference[1], STATISTICS_GROWTH))

    def divergence(self, names, norms, params, buffers) -> Optional[str]:
        """What breaks the divergence rule, or None."""
        ok = torch.isfinite(norms) & (norms <= DIVERGED_NORM)
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0])
            return (f"{names[i]} diverged (norm {float(norms[i]):.3g}; {int((~ok).sum())} "
                    "tensors NaN/inf or above 1e12)")
        for what, value, ref, limit in self._growth_limits(params, buffers):
            if ref > 0 and float(value) > limit * ref:
                return (f"the {what} norm diverged: {float(value):.3g}, {float(value) / ref:.3g} "
                        f"times its {ref:.3g} at initialisation (limit {limit:g} times)")
        return None

    @torch.no_grad()
    def check(self) -> Optional[str]:
        """What breaks the rule in the live model, or None: every floating-point parameter and
        buffer (student, teacher, predictor, Momentum BN statistics, MoCo queue) with one fused
        norm and one host sync."""
        p_names, params, b_names, bufs = self.named_state()
        norms, params, buffers = self.norms(params, bufs)
        ok = (torch.isfinite(norms) & (norms <= DIVERGED_NORM)).all()
        for _, value, ref, limit in self._growth_limits(params, buffers):
            if ref > 0:
                ok = ok & (value <= limit * ref)
        if bool(ok):  # the one host sync
            return None
        return self.divergence(p_names + b_names, norms, params, buffers)

    @torch.no_grad()
    def check_checkpoint(self, ckpt: dict, parts: list[str]) -> Optional[str]:
        """What breaks the rule in a checkpoint's state (its ``parts`` and model buffers), or
        None."""
        tensors = {f"{part}.{k}": v for part in parts for k, v in (ckpt.get(part) or {}).items()}
        tensors.update(ckpt.get("extra") or {})
        p_names, _, b_names, _ = self.named_state()
        p_names = [n for n in p_names if n in tensors]
        b_names = [n for n in b_names if n in tensors]
        norms, params, buffers = self.norms([tensors[n].float() for n in p_names],
                                            [tensors[n].float() for n in b_names])
        return self.divergence(p_names + b_names, norms, params, buffers)

"""`make demo`: the main job on the embedded default data (no download).

For now: a few Momentum² Teacher training steps on generated images, printing loss, alpha, m.
"""

from __future__ import annotations

import argparse

import torch

from .models import M2Teacher
from .models import schedules as S


def run_steps(steps: int = 20, batch: int = 16, res: int = 32, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    model = M2Teacher("resnet18", proj_hidden=256, proj_out=64, pred_hidden=256)
    params = list(model.student.parameters()) + list(model.predictor.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, res, res, generator=gen)
    rows = []
    for k in range(steps):
        v1 = base + 0.1 * torch.randn(base.shape, generator=gen)
        v2 = base.flip(-1) + 0.1 * torch.randn(base.shape, generator=gen)
        alpha = S.momentum_bn_alpha(k, steps)
        one_minus_m = S.ema_one_minus_m(k, steps, 0.032)
        for g in opt.param_groups:
            g["lr"] = S.learning_rate(k, steps, 0.05, warmup_steps=2)
        model.set_alpha(alpha)
        loss = model(v1, v2)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_teacher(one_minus_m)
        rows.append({"step": k, "loss": loss.item(), "alpha": alpha, "m": 1 - one_minus_m})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    print(f"{'step':>5} {'loss':>8} {'alpha':>7} {'m':>7}")
    for r in run_steps(args.steps):
        print(f"{r['step']:>5} {r['loss']:>8.4f} {r['alpha']:>7.4f} {r['m']:>7.4f}")


if __name__ == "__main__":
    main()

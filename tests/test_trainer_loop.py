"""The trainer loop's named steps; DDP gradient accumulation without all-reduce on early
micro-batches (no_sync)."""

import textwrap
from pathlib import Path

import pytest
import torch

from m2_pretrain.engine.trainer import Trainer

from helpers import run_torchrun, tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_fit_runs_named_steps_in_order(tmp_path, monkeypatch):
    cfg = tiny_config(train={"max_steps": 2, "accum_steps": 2, "batch_size": 4, "log_every": 2},
                      checkpoint={"every_steps": 2}, model={"arch": "resnet10t"})
    t = Trainer(cfg, tmp_path, progress=False)
    calls = []
    for name in ("next_batch", "augment", "forward_backward", "optimizer_step", "log",
                 "save_checkpoint", "_host_sync_checks"):
        orig = getattr(t, name)

        def wrapped(*a, _orig=orig, _name=name, **kw):
            calls.append(_name)
            return _orig(*a, **kw)

        monkeypatch.setattr(t, name, wrapped)
    result = t.fit()
    micro = ["next_batch", "augment", "forward_backward"]
    step1 = micro * 2 + ["optimizer_step"]
    assert calls == step1 + step1 + ["_host_sync_checks", "log", "save_checkpoint"]
    assert t.micro == 4 and result["step"] == 2 and len(result["history"]) == 1


@pytest.mark.slow
def test_ddp_accumulation_all_reduces_only_on_last_micro_batch(tmp_path):
    """Two gloo processes, 2 micro-batches per step: a comm hook records the micro-batch index
    of every gradient all-reduce; only the last micro-batch of each step may reduce, and the
    replicas stay equal."""
    script = tmp_path / "ddp_accum.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from helpers import tiny_config
        from m2_pretrain.engine.trainer import Trainer
        cfg = tiny_config(train={{"max_steps": 2, "accum_steps": 2, "batch_size": 4}},
                          data={{"num_images": 64, "augment_device": "cuda"}},
                          model={{"arch": "resnet10t"}})
        t = Trainer(cfg, {str(tmp_path / 'out')!r}, progress=False)
        seen = []
        def hook(state, bucket):
            seen.append((t.micro, bucket.buffer().numel()))
            return allreduce_hook(state, bucket)
        t.ddp.register_comm_hook(None, hook)
        t.fit()
        n_grad = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
        torch.save({{"seen": seen, "n_grad": n_grad,
                    "params": dict(t.model.student.named_parameters())}},
                   {str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.pt")
        dist.destroy_process_group()
    """))
    a, b = run_torchrun(script, 29541, REPO, tmp_path)
    # micro-batches 0..3; steps end at micro 1 and 3: only those all-reduce, each every
    # gradient element once (DDP re-buckets after its first iteration, so bucket counts differ)
    assert {m for m, _ in a["seen"]} == {1, 3}
    for micro in (1, 3):
        assert sum(n for m, n in a["seen"] if m == micro) == a["n_grad"]
    for k, v in a["params"].items():
        torch.testing.assert_close(v, b["params"][k], rtol=0, atol=0)


def test_hooks_run_at_their_period_and_after_the_last_step(tmp_path):
    """A hook handed in runs every ``period`` steps and after the last one, on the trained
    model; its numbers land in that step's history row (a row of their own between log rows)."""
    from m2_pretrain.engine.hooks import PeriodicHook

    cfg = tiny_config(train={"max_steps": 5, "batch_size": 4, "log_every": 2},
                      checkpoint={"every_steps": 5}, model={"arch": "resnet10t"})
    seen = []

    def probe(trainer):
        seen.append((trainer.step, trainer.model.training))
        return {"step_squared": float(trainer.step ** 2)}

    t = Trainer(cfg, tmp_path, progress=False, hooks=[PeriodicHook("probe", 3, probe)])
    t.register_hooks([None, PeriodicHook("quiet", 2, lambda tr: None)])
    assert [h.name for h in t.hooks] == ["probe", "quiet"]
    history = t.fit()["history"]
    assert seen == [(3, True), (5, True)]
    rows = {r["step"]: r for r in history}
    assert sorted(rows) == [2, 3, 4, 5]  # log rows at 2, 4, 5; the hook's own row at 3
    assert rows[3] == {"step": 3, "epoch": pytest.approx(3 / t.steps_per_epoch),
                       "probe_step_squared": 9.0}
    assert rows[5]["probe_step_squared"] == 25.0 and "loss" in rows[5]
    assert "probe_step_squared" not in rows[4]
    with pytest.raises(ValueError, match="period must be >= 1"):
        PeriodicHook("bad", 0, probe)

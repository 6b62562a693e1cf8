"""Small configs for fast CPU tests."""

from m2_pretrain.config import load_config


def tiny_config(**sections):
    overrides = [
        "model.arch=resnet18", "model.proj_hidden=32", "model.proj_out=16", "model.pred_hidden=32",
        "data.dataset=embedded", "data.res=32", "data.num_images=64", "data.workers=0",
        "train.batch_size=8", "train.max_steps=6", "train.log_every=1", "train.device=cpu",
        "optim.warmup_epochs=0.25", "optim.lr_reference_batch=8",
        "checkpoint.every_steps=2", "checkpoint.keep_last=10",
    ]
    for sec, kv in sections.items():
        for k, v in kv.items():
            overrides.append(f"{sec}.{k}={v}")
    return load_config(None, overrides)


def stop_after_step(trainer, step: int) -> None:
    """Make ``trainer`` stop, as after a signal, once optimizer step ``step`` (0-based) ran."""
    orig = trainer.optimizer.step

    def step_then_stop(*a, **kw):
        out = orig(*a, **kw)
        if trainer.step == step:
            trainer._stop_signal = 15
        return out

    trainer.optimizer.step = step_then_stop


def sigterm_during_step(trainer, monkeypatch, step: int) -> None:
    """Make a real SIGTERM arrive while ``trainer`` runs optimizer step ``step`` (0-based)."""
    import os
    import signal

    orig_step = trainer.optimizer.step

    def step_and_signal(*a, **kw):
        out = orig_step(*a, **kw)
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer.optimizer, "step", step_and_signal)


def run_torchrun(script, port: int, cwd, results_dir) -> tuple[dict, dict]:
    """Run ``script`` on 2 gloo processes with torchrun; fail with the tail of its stderr.

    Returns:
        What ranks 0 and 1 saved as ``results_dir/rank{r}.pt``.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", str(script)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tuple(torch.load(Path(results_dir) / f"rank{k}.pt", weights_only=True)
                 for k in (0, 1))

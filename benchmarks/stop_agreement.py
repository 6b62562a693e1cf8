"""Cost of the stop agreement (one all-reduce of a one-element flag per step) in the trainer's
own loop, under DDP on the CPU (gloo).

Two arms, interleaved in blocks of steps within one run of ``Trainer.run_step`` +
``Trainer.after_step`` (no logging, checkpoint or hook is due in the timed steps):
  agree   the trainer as it runs: ``StopAgreement.agree`` after every step
  local   the same steps with the agreement replaced by the process's own flag
and, alone, the latency of ``StopAgreement.agree`` (median of 200 calls).

    python benchmarks/stop_agreement.py --processes 2 --json benchmarks/results/stop_agreement_cpu.json

It starts itself under ``torch.distributed.run`` with ``--processes`` processes (gloo, CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="processes (gloo, CPU)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="images per view per process")
    ap.add_argument("--block", type=int, default=5, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=6, help="blocks per arm (interleaved)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--out-dir", default="/tmp/m2_stop_agreement_bench")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker(args) -> None:
    import torch.distributed as dist

    from m2_pretrain.config import load_config
    from m2_pretrain.engine.trainer import Trainer

    steps = args.warmup + 2 * args.block * args.blocks
    cfg = load_config(None, [
        f"model.arch={args.arch}", "model.zero_init_last=false", "data.dataset=embedded",
        f"data.res={args.res}", f"data.num_images={args.batch * args.processes * (steps + 1)}",
        "data.workers=0", f"train.batch_size={args.batch}", f"train.max_steps={steps}",
        f"train.log_every={steps}", f"checkpoint.every_steps={steps}", "train.device=cpu"])
    rank = int(os.environ.get("RANK", 0))
    t = Trainer(cfg, Path(args.out_dir) / "run", progress=False)
    agree = t._stop_agreement.agree
    latency = []
    times = {"agree": [], "local": []}
    with t._fit_session():
        t.model.train()
        for _ in range(args.warmup):
            t.run_step()
            t.after_step()
        for _ in range(200):
            t0 = time.perf_counter()
            agree(False)
            latency.append(time.perf_counter() - t0)
        for b in range(2 * args.blocks):
            arm = ("agree", "local")[b % 2]
            t._stop_agreement.agree = agree if arm == "agree" else (lambda flag: flag)
            for _ in range(args.block):
                t0 = time.perf_counter()
                t.run_step()
                t.after_step()
                times[arm].append(time.perf_counter() - t0)
        t._stop_agreement.agree = agree
    if rank == 0:
        res = {"arms": {k: {"median_s": statistics.median(v), "mean_s": statistics.fmean(v),
                            "min_s": min(v), "max_s": max(v), "steps": v}
                        for k, v in times.items()},
               "agree_call_median_s": statistics.median(latency),
               "agree_call_p90_s": sorted(latency)[int(0.9 * len(latency))]}
        Path(args.out_dir, "result.json").write_text(json.dumps(res))
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    import shutil

    import torch

    shutil.rmtree(args.out_dir, ignore_errors=True)
    Path(args.out_dir).mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.processes}",
           f"--master_port={args.port}", __file__, "--worker"] + [
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max((os.cpu_count() or 1) // args.processes, 1))}
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    res = json.loads(Path(args.out_dir, "result.json").read_text())
    a, b = res["arms"]["agree"], res["arms"]["local"]
    spread = [statistics.median(res["arms"][k]["steps"][i:i + args.block])
              for k in ("agree", "local") for i in range(0, len(a["steps"]), args.block)]
    res.update({"ratio_agree_local_median": a["median_s"] / b["median_s"],
                "block_median_range_s": [min(spread), max(spread)],
                "config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
                "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()})
    print(f"agree: median {a['median_s']:.4f} s/step, local: median {b['median_s']:.4f} "
          f"s/step, ratio {res['ratio_agree_local_median']:.4f}; block medians "
          f"{min(spread):.4f}-{max(spread):.4f} s; one agreement call: median "
          f"{res['agree_call_median_s'] * 1e6:.0f} us (p90 "
          f"{res['agree_call_p90_s'] * 1e6:.0f} us)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

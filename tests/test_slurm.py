"""SLURM: ranks from srun's environment, the stop decision agreed across processes, and the
sbatch templates against a real one-node cluster (tests/slurm_cluster.py; skipped with the
reason when slurm-wlm/munge are not installed)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from m2_pretrain.config import ConfigError
from m2_pretrain.engine.distributed import (
    PORT_BASE,
    REQUEUE_EXIT,
    DistInfo,
    LaunchError,
    StopAgreement,
    check_world,
    first_host,
    launch_from_env,
)

from helpers import tiny_config
from slurm_cluster import LocalSlurm, free_port as _port, missing

REPO = Path(__file__).resolve().parents[1]
STEP = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]"}
# a tiny pretraining config; STEPS is replaced by the number of steps
TINY = """\
model: {arch: resnet18, proj_hidden: 32, proj_out: 16, pred_hidden: 32}
data: {dataset: embedded, res: 32, num_images: 64, workers: 0}
train: {batch_size: 8, max_steps: STEPS, log_every: 1, device: cpu, seed: 3}
optim: {warmup_epochs: 0.25, lr_reference_batch: 8}
checkpoint: {every_steps: 2, keep_last: 30}
"""


# ----------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("nodelist,host", [
    ("vm", "vm"), ("node[01-04,07]", "node01"), ("gpu-a[1-2],gpu-b3", "gpu-a1"),
    ("rack[1-2]-n[08-09],x", "rack1-n08"), ("login.cluster.org", "login.cluster.org"),
])
def test_first_host_of_compressed_node_lists(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "n[1-3", "n]", "n[a-b]"])
def test_first_host_rejects_malformed_lists(bad):
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        first_host(bad)


def test_ranks_from_an_srun_task():
    env = {**STEP, "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    got = launch_from_env(env)
    assert (got.source, got.rank, got.world_size, got.local_rank) == ("slurm", 5, 16, 1)
    assert got.init_method == f"tcp://gpu07:{PORT_BASE + 4242}"
    got = launch_from_env({**env, "MASTER_PORT": "29999", "MASTER_ADDR": "10.0.0.1"})
    assert got.init_method == "tcp://10.0.0.1:29999"
    # torchrun's variables win (one torchrun per node under srun)
    got = launch_from_env({**env, "WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3"})
    assert (got.source, got.rank, got.world_size, got.local_rank) == ("torchrun", 3, 8, 3)
    # the batch script itself, one task: one process
    assert launch_from_env({"SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}).world_size == 1
    assert launch_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1
    assert launch_from_env({}).source == "single"


@pytest.mark.parametrize("env,match", [
    ({**STEP, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}, "SLURM_NTASKS is not"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "3"}, "not an srun task"),
    ({**STEP, "SLURM_PROCID": "2", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "outside"),
    ({**STEP, "SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "not an integer"),
])
def test_inconsistent_slurm_environment_is_one_line(env, match):
    with pytest.raises(LaunchError, match=match) as e:
        launch_from_env(env)
    assert "\n" not in str(e.value)


def test_world_size_the_config_cannot_use():
    check_world(tiny_config(), 4, cuda=False)  # 64 images, 8 per process: fine
    with pytest.raises(ConfigError, match="'data.num_images'"):
        check_world(tiny_config(), 16, cuda=False)
    with pytest.raises(ConfigError, match="'model.moco.queue'"):
        check_world(tiny_config(model={"method": "mocov2", "moco_queue": 8}), 2, cuda=False)
    with pytest.raises(ConfigError, match="needs CUDA"):
        check_world(tiny_config(model={"student_norm": "sync"}), 2, cuda=False)


def test_cli_reports_a_bad_slurm_environment_before_training(tmp_path):
    env = {**os.environ, **STEP, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    env.pop("SLURM_NTASKS", None)
    r = subprocess.run([sys.executable, "-m", "m2_pretrain.cli", "train", "--output-dir",
                        str(tmp_path / "run"), "train.device=cpu", "data.dataset=embedded"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: SLURM_PROCID=1 is set but SLURM_NTASKS is not: start one task per GPU with "
        "`srun --ntasks=N`, or unset SLURM_PROCID"], r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("template", ["pretrain.sbatch", "detectron2.sbatch", "evaluate.sbatch"])
def test_templates_refuse_to_run_outside_slurm(template):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / template)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "submit it with sbatch" in r.stderr


def test_sigusr1_stops_after_the_step_with_the_requeue_status(tmp_path, monkeypatch):
    """SLURM's time-limit warning (SIGUSR1) in one process: checkpoint after the step it
    arrived in, then ``m2-pretrain train`` returns ``REQUEUE_EXIT``; ``--resume`` finishes."""
    from m2_pretrain import cli
    from m2_pretrain.checkpoint import list_checkpoints
    from m2_pretrain.engine.trainer import Trainer

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("STEPS", "4").replace("every_steps: 2", "every_steps: 4"))
    run_step = Trainer.run_step

    def run_step_then_signal(self):
        run_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(Trainer, "run_step", run_step_then_signal)
    argv = ["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert cli._train(cli.parse_args(argv)) == REQUEUE_EXIT
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt_00000002.pth"]
    monkeypatch.setattr(Trainer, "run_step", run_step)
    assert cli._train(cli.parse_args(argv + ["--resume"])) == 0
    assert list_checkpoints(tmp_path / "run")[-1].name == "ckpt_00000004.pth"


def test_loader_workers_outlive_the_time_limit_warning():
    """SLURM's SIGUSR1 reaches every process of a job: a loader worker must not die of it."""
    code = ("import os, signal; from m2_pretrain.data.feed import ignore_time_limit_signal; "
            "ignore_time_limit_signal(0); os.kill(os.getpid(), signal.SIGUSR1); print('alive')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "alive", r.stderr[-2000:]


# ----------------------------------------------------------------------------- agreement
def _agree_worker(rank: int, port: int, flags: list, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    agreement = StopAgreement(DistInfo(rank, 2))
    out.put((rank, [agreement.agree(f[rank]) for f in flags]))
    dist.destroy_process_group()


def test_stop_agreement_stops_every_process_when_one_asks():
    flags = [(False, False), (False, True), (True, False), (True, True)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    ps = [ctx.Process(target=_agree_worker, args=(r, port, flags, q)) for r in range(2)]
    for p in ps:
        p.start()
    got = dict(q.get(timeout=120) for _ in ps)
    for p in ps:
        p.join(timeout=60)
    assert got[0] == got[1] == [False, True, True, True]
    assert StopAgreement(DistInfo()).agree(True) is True  # one process: no collective


# ----------------------------------------------------------------------------- scheduler
JOB_TIMEOUT = 300  # seconds for any one job to reach the state a test waits for


@pytest.fixture(scope="module")
def slurm():
    why = missing()
    if why:
        pytest.skip(why)
    cluster = LocalSlurm().start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Job:
    """One sbatch submission and its log."""

    def __init__(self, slurm: LocalSlurm, template: str, log: Path, env: dict, args=(),
                 sbatch_args=()) -> None:
        self.slurm, self.log = slurm, log
        r = subprocess.run(["sbatch", "--parsable", "-o", str(log), "--chdir", str(REPO),
                            *sbatch_args, str(REPO / "scripts" / "slurm" / template), *args],
                           env={**slurm.env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                                **env},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        self.id = r.stdout.strip().split(";")[0]

    def field(self, name: str) -> str:
        r = subprocess.run(["scontrol", "show", "job", self.id], env=self.slurm.env,
                           capture_output=True, text=True, timeout=30)
        for word in r.stdout.split():
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
        return ""

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, ok, what: str, timeout: float = JOB_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            time.sleep(0.2)
        subprocess.run(["scancel", self.id], env=self.slurm.env, timeout=30)
        pytest.fail(f"job {self.id}: timed out waiting for {what}; log:\n{self.text()[-3000:]}")

    def requeued_then_started(self) -> None:
        """Wait until the job is requeued, then let it start at once (SLURM delays a requeued
        batch job by about two minutes; an administrator's `StartTime=now` lifts that)."""
        self.wait_for(lambda: self.field("JobState") == "PENDING"
                      and self.field("Restarts") == "1", "the requeue")
        # Not at once: slurmd revokes the first run's credential with one-second timestamps, and
        # a restart within the same second is refused ("Killing non-startable batch JobId=N:
        # Job credential revoked"); SLURM's own delay covers this, 3 s do too.
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={self.id}", "StartTime=now"],
                       env=self.slurm.env, check=True, timeout=30)

    def finished(self) -> None:
        self.wait_for(lambda: self.field("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                      "the end of the job")
        if self.field("JobState") != "COMPLETED":
            show = subprocess.run(["scontrol", "show", "job", self.id], env=self.slurm.env,
                                  capture_output=True, text=True, timeout=30).stdout
            daemons = "".join(f"\n--- {name} (tail)\n" + "\n".join(
                (self.slurm.root / name).read_text(errors="replace").splitlines()[-40:])
                for name in ("slurmctld.log", "slurmd.log") if (self.slurm.root / name).exists())
            pytest.fail(f"job {self.id} ended {self.field('JobState')}\n{show}\n--- job log "
                        f"(tail)\n{self.text()[-3000:]}{daemons}")


def _final_state(run: Path, steps: int) -> dict:
    ckpt = torch.load(run / f"ckpt_{steps:08d}.pth", weights_only=True)
    return {part: ckpt[part] for part in ("student", "teacher", "predictor")}


def _assert_same_state(a: dict, b: dict) -> None:
    for part, tensors in a.items():
        assert tensors.keys() == b[part].keys()
        for k, v in tensors.items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs"


@pytest.mark.slow
def test_pretrain_template_requeue_resume_and_torchrun(slurm, tmp_path):
    """(a) sbatch of pretrain.sbatch with 2 tasks = torchrun --nproc_per_node=2, teacher
    buffers included; (b) `scancel --signal=USR1` mid-run: requeued, resumed, same final
    weights, and the log names the stop and resume steps."""
    steps = 12
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("STEPS", str(steps)))
    common = {"CONFIG": str(cfg)}
    # submitted first, so it runs first; the uninterrupted one runs while it waits requeued
    cut = Job(slurm, "pretrain.sbatch", tmp_path / "cut.log",
              {**common, "OUT": str(tmp_path / "cut")}, sbatch_args=["--ntasks=2"])
    full = Job(slurm, "pretrain.sbatch", tmp_path / "full.log",
               {**common, "OUT": str(tmp_path / "full")}, sbatch_args=["--ntasks=2"])
    cut.wait_for(lambda: (tmp_path / "cut" / "ckpt_00000002.pth").exists(), "step 2")
    subprocess.run(["scancel", "--signal=USR1", cut.id], env=slurm.env, check=True, timeout=30)
    cut.requeued_then_started()
    cut.finished()
    full.finished()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port", str(_port()), "-m", "m2_pretrain.cli", "train",
                        "--config", str(cfg), "--output-dir", str(tmp_path / "torchrun"),
                        "--no-progress"], cwd=REPO, capture_output=True, text=True,
                       timeout=JOB_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]

    reference = _final_state(tmp_path / "torchrun", steps)
    _assert_same_state(_final_state(tmp_path / "full", steps), reference)  # (a)
    _assert_same_state(_final_state(tmp_path / "cut", steps), reference)  # (b)
    log = cut.text()
    stops = [int(line.split("stopped after step ")[1].split(",")[0])
             for line in log.splitlines() if "stopped after step" in line]
    assert len(stops) == 2 and stops[0] == stops[1] and 2 <= stops[0] < steps, log[-3000:]
    assert f"resumed from {tmp_path / 'cut' / f'ckpt_{stops[0]:08d}.pth'} at step {stops[0]}" in log
    assert "requeueing job" in log and "start 1," in log


def _pid_of_task(job_id: str, procid: int) -> int:
    """The pid of the m2-pretrain process of task ``procid`` of job ``job_id``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in
                       (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(procid)
                and "m2_pretrain.cli" in cmd):
            return int(proc.name)
    raise LookupError(f"no m2_pretrain process of task {procid} in job {job_id}")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_after_the_same_step(slurm, tmp_path):
    """(c) SIGTERM to task 1's process only: both tasks stop after the same step, with one
    checkpoint, and exit with the requeue status (no hang). The run is long (it stops at the
    signal): 60 steps could all be done before the signal landed on an idle machine."""
    steps = 1000
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("STEPS", str(steps)))
    job = Job(slurm, "pretrain.sbatch", tmp_path / "job.log",
              {"CONFIG": str(cfg), "OUT": str(tmp_path / "run")}, sbatch_args=["--ntasks=2"])
    job.wait_for(lambda: (tmp_path / "run" / "ckpt_00000002.pth").exists(), "step 2")
    os.kill(_pid_of_task(job.id, 1), signal.SIGTERM)
    job.wait_for(lambda: "requeueing job" in job.text(), "both tasks to stop", timeout=120)
    subprocess.run(["scancel", job.id], env=slurm.env, timeout=30)
    log = job.text()
    stops = [line for line in log.splitlines() if "stopped after step" in line]
    assert len(stops) == 2, log[-3000:]
    assert {s.split("stopped after step ")[1].split(",")[0] for s in stops} == {
        stops[0].split("stopped after step ")[1].split(",")[0]}
    assert any("signal to another process" in s for s in stops)  # task 0 was not signalled
    assert any(f"signal {int(signal.SIGTERM)}" in s for s in stops)
    step = int(stops[0].split("stopped after step ")[1].split(",")[0])
    assert step < steps and (tmp_path / "run" / f"ckpt_{step:08d}.pth").exists()
    assert f"Exited with exit code {REQUEUE_EXIT}" in log


@pytest.mark.slow
def test_detectron2_template_is_requeued_and_resumes(slurm, tmp_path):
    """(d) detectron2.sbatch: 2 iterations of the demo Mask R-CNN; signalled during the first,
    it writes model_0000000.pth, is requeued and resumes at iteration 1."""
    pytest.importorskip("detectron2")
    out = tmp_path / "out"
    job = Job(slurm, "detectron2.sbatch", tmp_path / "job.log",
              {"CONFIG": str(REPO / "configs" / "detectron2" / "demo_shapes_mask_rcnn_R18.yaml"),
               "OUT": str(out), "DETECTRON2_DATASETS": str(tmp_path / "datasets"),
               "OMP_NUM_THREADS": "2"},
              args=["M2.RANDOM_INIT", "True", "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "2",
                    "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "2",
                    "DATASETS.TEST", "()"],
              sbatch_args=["--cpus-per-task=2"])
    job.wait_for(lambda: "Starting training from iteration 0" in job.text(), "training")
    subprocess.run(["scancel", "--signal=USR1", job.id], env=slurm.env, check=True, timeout=30)
    job.requeued_then_started()
    job.finished()
    log = job.text()
    assert "stopped after iteration 0 on signal" in log, log[-3000:]
    assert f"Loading trainer from {out / 'model_0000000.pth'}" in log
    assert "Starting training from iteration 1" in log
    assert (out / "model_final.pth").exists()


@pytest.mark.slow
def test_evaluation_template_runs_knn_on_two_tasks_with_the_numbers_of_one(slurm, tmp_path):
    """evaluate.sbatch with 2 srun tasks (ranks and rendezvous from SLURM's variables): one
    results.json, world size 2, the kNN numbers of the one-process command."""
    import json

    import timm

    torch.manual_seed(0)
    weights = tmp_path / "enc.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    Path(str(weights) + ".json").write_text(json.dumps({"arch": "resnet10t"}))
    args = ["knn", "--weights", str(weights), "data.dataset=embedded", "data.res=32",
            "data.num_images=120", "data.workers=0", "data.knn_train_split=train",
            "data.knn_test_split=test", "train.device=cpu", "knn.k=10"]
    job = Job(slurm, "evaluate.sbatch", tmp_path / "eval.log", {},
              args=[*args, "--output-dir", str(tmp_path / "two")], sbatch_args=["--ntasks=2"])
    one = subprocess.run([sys.executable, "-m", "m2_pretrain.cli", *args, "--no-progress",
                          "--output-dir", str(tmp_path / "one")], cwd=REPO, capture_output=True,
                         text=True, timeout=JOB_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-2000:]
    job.finished()
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert (b["results"]["top1"], b["results"]["top5"]) == (a["results"]["top1"],
                                                            a["results"]["top5"])
    assert job.text().count("knn: top-1") == 1, job.text()[-2000:]

"""scripts/gpu_check.sh argument handling and budget arithmetic (dry run), and its table
printer on recorded JSON."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check_table  # noqa: E402

STEPS = ["setup", "cuda_tests", "eager_r50", "eager_r18", "real_r18", "real_r50", "eval_features",
         "compile_r18"]


def _speed_json(m2, byol, ceiling, ref, mem_m2=10.0, mem_byol=10.0):
    arms = {"m2": {"median_s": m2, "peak_mem_gib": mem_m2},
            "byol_bn": {"median_s": byol, "peak_mem_gib": mem_byol},
            "ceiling": {"median_s": ceiling, "peak_mem_gib": 9.0},
            "m2_reference": {"median_s": ref, "peak_mem_gib": 12.0}}
    return {"arms": arms, "ratios": {"m2/byol_bn": m2 / byol, "m2/ceiling": m2 / ceiling,
                                     "m2_reference/m2": ref / m2}}


def test_table_against_targets(tmp_path):
    (tmp_path / "eager_r50.json").write_text(json.dumps(_speed_json(1.04, 1.0, 0.95, 1.6)))
    (tmp_path / "eager_r18.json").write_text(
        json.dumps(_speed_json(1.2, 1.0, 1.0, 1.2, mem_m2=11.0)))
    real = {"real": [{"data_wait_share": 0.02, "fraction_of_m2_step_rate": 0.9,
                      "fraction_of_m2_augment_rate": 0.97}]}
    (tmp_path / "real_r18.json").write_text(json.dumps(real))
    (tmp_path / "steps.tsv").write_text("cuda_tests\t0\t40\neager_r50\t0\t100\neager_r18\t0\t80\n"
                                        "real_r18\t0\t90\nreal_r50\t124\t150\n"
                                        "compile_r18\t1\t20\n")
    (tmp_path / "device.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.x",
                                                      "cuda": "13"}))
    out = gpu_check_table.table(tmp_path)
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line
            for line in out.splitlines() if line.startswith("| ")}
    r50, r18 = gpu_check_table.SHAPES["r50"], gpu_check_table.SHAPES["r18"]
    assert "NVIDIA H200" in out
    assert rows[("cuda_tests", "", "exit status")].rstrip(" |").endswith("ok")
    assert "| 1.040 | <= 1.05 | ok |" in rows[("eager", r50, "m2/byol_bn")]
    assert "| 1.095 | <= 1.1 | ok |" in rows[("eager", r50, "m2/ceiling")]
    assert "| 1.200 | <= 1.1 | MISS |" in rows[("eager", r18, "m2/byol_bn")]
    assert "| 1.100 | <= 1.05 | MISS |" in rows[("eager", r18, "peak memory m2/byol_bn")]
    assert "| 1.538 | >= 1.5 | ok |" in rows[("eager", r50, "m2_reference/m2")]
    assert "| 0.020 | < 0.05 | ok |" in rows[("real", r18, "data wait share")]
    assert "| 0.970 | >= 0.95 | ok |" in rows[("real", r18, "images/s / (m2 step + augmentation)")]
    assert rows[("real", r50, "data wait share")].endswith("| - | < 0.05 | timed out |")
    assert "| failed (exit 1) |" in rows[("compile", r18, "m2/byol_bn")]
    assert rows[("eval", "feature extraction", "images/s")].endswith("| not run |")
    (tmp_path / "eval_features.json").write_text(json.dumps({"rows": [
        {"arch": "resnet50", "res": 224, "precision": "bf16", "batch": 256,
         "images_per_s": 2950.04}]}))
    (tmp_path / "steps.tsv").write_text("eval_features\t124\t40\n")
    out = gpu_check_table.table(tmp_path)
    assert "| eval | resnet50 224 px bf16 batch 256 | images/s | 2950.0 | | (partial: timed out) |" in out
    (tmp_path / "steps.tsv").write_text("eager_r50\t124\t70\n")  # arms written before the cap
    out = gpu_check_table.table(tmp_path)
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line
            for line in out.splitlines() if line.startswith("| ")}
    assert "| 1.040 | <= 1.05 | ok (partial: timed out) |" in rows[("eager", r50, "m2/byol_bn")]
    assert rows[("cuda_tests", "", "exit status")].endswith("| not run |")
    assert rows[("compile", r18, "m2/byol_bn")].endswith("| not run |")


def _dry_run(out, *budget):
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out),
                           "--python", sys.executable, *budget],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("budget", [540, 300, 900])
def test_step_caps_add_up_to_the_budget_less_a_margin(tmp_path, budget):
    """The timeouts the dry run prints (every step's own cap: nothing has used time yet) add
    up to at most the budget less the start/table margin, whatever --budget is."""
    r = _dry_run(tmp_path / "run", "--budget", str(budget))
    assert r.returncode == 0, r.stderr
    caps = {m.group(1): int(m.group(2))
            for m in re.finditer(r"^\[dry-run\] (\w+) \(timeout (\d+)s\)", r.stdout, re.M)}
    assert list(caps) == STEPS
    margin = 55 * budget // 540
    assert sum(caps.values()) + margin <= budget, (caps, budget)
    assert all(c >= 40 * budget // 540 for c in caps.values())
    assert f"step caps add up to {sum(caps.values())}s" in r.stdout


def test_script_dry_run_and_argument_errors(tmp_path):
    out = tmp_path / "run"
    r = _dry_run(out)
    assert r.returncode == 0, r.stderr
    steps = [line.split("\t")[0] for line in (out / "steps.tsv").read_text().splitlines()]
    assert steps == STEPS
    assert "--arch resnet50 --res 224 --batch 128" in r.stdout
    assert "--arch resnet18 --res 96 --batch 256 --compile --arms byol_bn,m2" in r.stdout
    assert "tests/test_gpu_like.py" in r.stdout and "| compile |" in r.stdout
    assert "benchmarks/eval_throughput.py --device cuda" in r.stdout
    again = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = subprocess.run(["bash", "scripts/gpu_check.sh", "--budget", "9m"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--budget must be whole seconds" in bad.stderr
    bad = subprocess.run(["bash", "scripts/gpu_check.sh", "--bogus"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr

"""Print the table of a ``scripts/gpu_check.sh`` run against the GPU targets.

    python scripts/gpu_check_table.py benchmarks/results/gpu_check_<date>

Reads the step JSONs (``eager_r50.json``, ``eager_r18.json``, ``real_r18.json``,
``real_r50.json``, ``compile_r18.json``, ``eval_features.json``) and ``steps.tsv``. A value missing from its JSON shows
as "timed out" when its step ran out of time (exit 124 or 137), "failed (exit N)" when it
failed, "not run" when it never started (skipped, or absent from ``steps.tsv``); a value from a
step that timed out after writing it is marked "partial". Markdown on stdout; exit status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

SHAPES = {"r50": "ResNet-50 224 px 128/view", "r18": "ResNet-18 96 px 256/view"}


def _ratio(key: str) -> Callable[[dict], Optional[float]]:
    return lambda r: r.get("ratios", {}).get(key)


def _peak(r: dict) -> Optional[float]:
    arms = r.get("arms", {})
    a, b = (arms.get(k, {}).get("peak_mem_gib") for k in ("m2", "byol_bn"))
    return a / b if a and b else None


def _real(field: str) -> Callable[[dict], Optional[float]]:
    def get(r: dict) -> Optional[float]:
        rows = r.get("real") or [{}]
        return rows[0].get(field)
    return get


# (step, metric, getter, comparison, target)
TARGETS = []
for s, eager_target in (("r50", 1.05), ("r18", 1.10)):
    TARGETS += [
        (f"eager_{s}", "m2/byol_bn", _ratio("m2/byol_bn"), "<=", eager_target),
        (f"eager_{s}", "m2/ceiling", _ratio("m2/ceiling"), "<=", 1.10),
        (f"eager_{s}", "peak memory m2/byol_bn", _peak, "<=", 1.05),
        (f"eager_{s}", "m2_reference/m2", _ratio("m2_reference/m2"), ">=", 1.5),
    ]
for s in ("r18", "r50"):
    TARGETS += [
        (f"real_{s}", "data wait share", _real("data_wait_share"), "<", 0.05),
        (f"real_{s}", "images/s / (m2 step + augmentation)",
         _real("fraction_of_m2_augment_rate"), ">=", 0.95),
        (f"real_{s}", "images/s / m2 step", _real("fraction_of_m2_step_rate"), "info", None),
    ]
TARGETS.append(("compile_r18", "m2/byol_bn", _ratio("m2/byol_bn"), "<=", 1.02))
TIMED_OUT = ("124", "137")  # timeout's status, and SIGKILL's after --kill-after

_CMP = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "<": lambda v, t: v < t}


def read_steps(folder: Path) -> dict[str, tuple[str, str]]:
    """``steps.tsv`` -> {step: (exit status, seconds)}."""
    path = folder / "steps.tsv"
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                out[parts[0]] = (parts[1], parts[2])
    return out


def not_measured(status: str) -> str:
    """The verdict of a metric its step did not write, from the step's exit status."""
    if status in TIMED_OUT:
        return "timed out"
    if status.isdigit() and status != "0":
        return f"failed (exit {status})"
    return "not run" if status in ("not run", "skipped", "dry-run") else "no value"


def eval_rows(folder: Path, status: str) -> list[str]:
    """Rows of the evaluation's feature-extraction rates (information, no target)."""
    path = folder / "eval_features.json"
    rows = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
    if not rows:
        return [f"| eval | feature extraction | images/s | - | | {not_measured(status)} |"]
    partial = " (partial: timed out)" if status in TIMED_OUT else ""
    return [f"| eval | {r['arch']} {r['res']} px {r['precision']} batch {r['batch']} | images/s "
            f"| {r['images_per_s']:.1f} | |{partial} |" for r in rows]


def table(folder: Path) -> str:
    steps = read_steps(folder)
    lines = []
    dev = folder / "device.json"
    if dev.is_file():
        d = json.loads(dev.read_text())
        lines.append(f"{d.get('device')}, torch {d.get('torch')}, CUDA {d.get('cuda')}")
        lines.append("")
    rc = steps.get("cuda_tests", ("not run", "0"))[0]
    lines += ["| step | shape | metric | value | target | |", "|---|---|---|---|---|---|",
              f"| cuda_tests | | exit status | {rc} | 0 | "
              f"{'ok' if rc == '0' else 'FAIL' if rc.isdigit() else rc} |"]
    for step, metric, get, cmp, target in TARGETS:
        kind, shape = step.split("_")
        path = folder / f"{step}.json"
        value = get(json.loads(path.read_text())) if path.is_file() else None
        status = steps.get(step, ("not run", "0"))[0]
        if value is None:
            verdict, shown = not_measured(status), "-"
        else:
            shown = f"{value:.3f}"
            verdict = "" if cmp == "info" else ("ok" if _CMP[cmp](value, target) else "MISS")
            if status in TIMED_OUT:
                verdict = f"{verdict} (partial: timed out)".strip()
        tgt = "" if cmp == "info" else f"{cmp} {target}"
        lines.append(f"| {kind} | {SHAPES[shape]} | {metric} | {shown} | {tgt} | {verdict} |")
    lines += eval_rows(folder, steps.get("eval_features", ("not run", "0"))[0])
    total = sum(int(s) for _, s in steps.values() if s.isdigit())
    lines.append("")
    lines.append(f"steps: {', '.join(f'{k} {v[0]} ({v[1]} s)' for k, v in steps.items())}; "
                 f"{total} s in steps")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        print(f"gpu_check_table.py: {args.folder} is not a folder", file=sys.stderr)
        return 2
    print(table(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())

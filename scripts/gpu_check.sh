#!/usr/bin/env bash
# One GPU check (make gpu-check): the CUDA tests, then benchmarks/speed.py eager at
# ResNet-50 224 px 128/view and ResNet-18 96 px 256/view, --real at both, the evaluation's
# feature extraction (benchmarks/eval_throughput.py, fp32 and bf16) and --compile at
# ResNet-18 (the byol_bn and m2 arms). Each step runs under `timeout` with the cap declared in
# CAPS below; the caps add up to the budget (default 540 s) less a margin, and scale with
# --budget, so the whole run fits by construction. Each step writes JSON (speed.py after every
# arm, so a step stopped by its cap keeps the arms that finished) or a log under the output
# folder; scripts/gpu_check_table.py prints one table against the targets.
#
#   bash scripts/gpu_check.sh [--python PY] [--out DIR] [--budget S] [--workers N] [--dry-run]
#
# Works with a Python that already has torch, torchvision and timm (no detectron2): the
# project is installed with --no-deps and only missing modules are installed.
set -u -o pipefail

PY=python3
OUT=""
BUDGET=540
WORKERS=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

# Step caps in seconds at the default budget, in run order; MARGIN is left for the start, the
# table and the time `timeout --kill-after` may add. Scaled by BUDGET / 540.
CAPS=(setup:40 cuda_tests:80 eager_r50:65 eager_r18:40 real_r18:55 real_r50:85 eval_features:40
      compile_r18:80)
MARGIN=55
declare -A CAP
total=0
for c in "${CAPS[@]}"; do
  CAP[${c%%:*}]=$(( ${c#*:} * BUDGET / 540 ))
  total=$(( total + CAP[${c%%:*}] ))
done
MARGIN=$(( MARGIN * BUDGET / 540 ))
if [ $(( total + MARGIN )) -gt "$BUDGET" ]; then
  echo "gpu_check.sh: the step caps (${total}s) and the margin (${MARGIN}s) exceed the budget" \
    "(${BUDGET}s); lower a cap in CAPS" >&2
  exit 2
fi
echo "budget ${BUDGET}s: step caps add up to ${total}s, margin $(( BUDGET - total ))s"

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_check_$(date -u +%Y%m%d_%H%M%S)}"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "gpu_check.sh: $OUT exists and is not empty; pass another --out" >&2; exit 2
fi
mkdir -p "$OUT"
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$WORKERS" ]; then
  WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
fi

# step NAME CMD...: run CMD under timeout (its cap, or what is left of the budget if less),
# log to $OUT/NAME.log, record "NAME rc seconds" in $OUT/steps.tsv (rc 124/137: timed out).
step() {
  local name="$1" limit="${CAP[$1]}"; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY" = 1 ]; then
    echo "[dry-run] $name (timeout ${limit}s): $*"
    printf '%s\t%s\t%s\n' "$name" "dry-run" 0 >> "$OUT/steps.tsv"
    return 0
  fi
  if [ "$limit" -lt 30 ]; then
    echo "== $name: skipped, ${left}s of the budget left"
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$OUT/steps.tsv"
    return 0
  fi
  echo "== $name (timeout ${limit}s)"
  local t0=$(date +%s) rc=0
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  [ "$rc" = 0 ] || { echo "   rc=$rc, last lines of $OUT/$name.log:"; tail -n 5 "$OUT/$name.log"; }
}

# --- environment: the project without its pinned dependencies, and only what is missing
if [ "$DRY" = 0 ]; then
  "$PY" -c "import torch, torchvision, timm; assert torch.cuda.is_available(), 'no CUDA device'" \
    || { echo "gpu_check.sh: $PY needs torch, torchvision, timm and a CUDA device" >&2; exit 1; }
fi
step setup bash -c '
  "$0" -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "(pip install --no-deps -e . failed; using PYTHONPATH)"
  for pair in yaml:PyYAML tqdm:tqdm cv2:opencv-python-headless PIL:pillow pytest:pytest numpy:numpy; do
    mod="${pair%%:*}"; pkg="${pair#*:}"
    "$0" -c "import $mod" 2>/dev/null || "$0" -m pip install -q "$pkg" \
      || echo "could not install $pkg (module $mod); steps that need it will fail"
  done
  "$0" -c "import json, torch; print(json.dumps({\"device\": torch.cuda.get_device_name(),
    \"torch\": torch.__version__, \"cuda\": torch.version.cuda}))" > "$1/device.json"' "$PY" "$OUT"

SPEED=("$PY" benchmarks/speed.py --device cuda)
R50=(--arch resnet50 --res 224 --batch 128)
R18=(--arch resnet18 --res 96 --batch 256)
step cuda_tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_fused_bn.py \
  tests/test_no_sync.py tests/test_momentum_bn.py tests/test_batch_augment.py \
  tests/test_gpu_like.py -k "cuda or sync"
step eager_r50 "${SPEED[@]}" "${R50[@]}" --json "$OUT/eager_r50.json"
step eager_r18 "${SPEED[@]}" "${R18[@]}" --json "$OUT/eager_r18.json"
step real_r18 "${SPEED[@]}" "${R18[@]}" --real stl10 --real-steps 30 --workers "$WORKERS" \
  --repeats 3 --json "$OUT/real_r18.json"
step real_r50 "${SPEED[@]}" "${R50[@]}" --real imagefolder --real-steps 20 --workers "$WORKERS" \
  --repeats 3 --json "$OUT/real_r50.json"
step eval_features "$PY" benchmarks/eval_throughput.py --device cuda --batch 256 --seconds 5 \
  --out "$OUT/eval_features.json"
step compile_r18 "${SPEED[@]}" "${R18[@]}" --compile --arms byol_bn,m2 --repeats 3 \
  --json "$OUT/compile_r18.json"

"$PY" scripts/gpu_check_table.py "$OUT" | tee "$OUT/table.md"
echo "results in $OUT ($(( $(date +%s) - START ))s)"

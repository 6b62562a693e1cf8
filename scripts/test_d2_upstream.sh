#!/usr/bin/env bash
# The modern environment: the whole test suite on Python 3.12, numpy 2 and Detectron2 built
# from its source (with its C++ ops).
#
# Usage: scripts/test_d2_upstream.sh <detectron2 source tree or .tar.gz> [pytest args...]
#   (pytest args replace the default `tests`, e.g. one file)
#
# The source is built once into a scratch venv outside the repository:
# $M2_SCRATCH/m2-d2-upstream/<key>/venv (M2_SCRATCH defaults to /tmp), where <key> hashes the
# source, the Python version and the torch/torchvision pins. The venv holds requirements/base.txt
# (the same pinned torch as .venv) and requirements/detectron2-upstream.txt (numpy 2), re-synced
# on every run (a no-op when nothing changed); the repository is put on PYTHONPATH, nothing is
# installed into it or into .venv. PYTHON picks the interpreter (default: python3.12 on PATH,
# else pyenv's newest 3.12). MAX_JOBS caps the compile jobs (default: the number of CPUs).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  pyenv_312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null \
    | sort -V | tail -1 || true)
  for cand in python3.12 $pyenv_312; do
    if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PYTHON=$cand
      break
    fi
  done
  [[ -n "${PYTHON:-}" ]] || { echo "no Python 3.12 found: set PYTHON=<python3.12>" >&2; exit 2; }
fi
SRC=${1:?usage: scripts/test_d2_upstream.sh <detectron2 source tree or .tar.gz> [pytest args...]}
shift
[[ -e "$SRC" ]] || { echo "D2_SRC=$SRC does not exist" >&2; exit 2; }
SRC=$(realpath "$SRC")
cd "$HERE"
REQS=("$HERE/requirements/base.txt" "$HERE/requirements/detectron2-upstream.txt")
TESTS=(tests)
if [[ $# -gt 0 ]]; then
  TESTS=()
fi

if [[ -f "$SRC" ]]; then
  [[ "$SRC" == *.tar.gz || "$SRC" == *.tgz ]] \
    || { echo "D2_SRC=$SRC: expected a .tar.gz or a source directory" >&2; exit 2; }
  src_hash=$(sha256sum < "$SRC")
elif [[ -f "$SRC/setup.py" && -d "$SRC/detectron2" ]]; then
  # content of the tree, without VCS data and build outputs
  src_hash=$(cd "$SRC" && find . -type f ! -path './.git/*' ! -path './build/*' \
    ! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -name '*.so' -print0 | sort -z \
    | xargs -0 sha256sum | sha256sum)
else
  echo "D2_SRC=$SRC is neither a .tar.gz nor a Detectron2 source tree" \
    "(with setup.py and detectron2/)" >&2
  exit 2
fi
# what the compiled ops depend on: the source, the interpreter, torch
KEY=$( { echo "$src_hash"; "$PYTHON" -VV; grep -E '^torch(vision)?==' "${REQS[0]}"; } \
  | sha256sum | cut -c1-16)
ROOT=${M2_SCRATCH:-/tmp}/m2-d2-upstream
DIR=$ROOT/$KEY
VENV=$DIR/venv
mkdir -p "$ROOT"

build() {
  echo "[test-d2-upstream] building $SRC into $VENV"
  rm -rf "$DIR"
  mkdir -p "$DIR/src"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "${REQS[@]/#/-r}"
  if [[ -f "$SRC" ]]; then
    tar -xzf "$SRC" -C "$DIR/src"
  else
    tar -C "$SRC" --exclude=./.git --exclude=./build -cf - . | tar -C "$DIR/src" -xf -
  fi
  local tree=$DIR/src
  if [[ ! -f "$tree/setup.py" ]]; then  # an archive with a top-level folder
    tree=$(dirname "$(find "$DIR/src" -mindepth 2 -maxdepth 2 -name setup.py | head -1)")
  fi
  [[ -f "$tree/setup.py" ]] || { echo "no setup.py in $SRC" >&2; exit 2; }
  # --no-deps: its dependencies are the pinned ones above (pip check verifies them)
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" -m pip install -q --no-deps \
    --no-build-isolation "$tree"
  rm -rf "$DIR/src"
  "$VENV/bin/python" -c "from detectron2 import _C, __version__ as v
print('[test-d2-upstream] built detectron2', v, 'with its C++ ops')"
  touch "$DIR/.built"
}

# one build per key at a time; an interrupted build (no .built stamp) starts over
exec 9>"$ROOT/$KEY.lock"
flock 9
if [[ -f "$DIR/.built" ]]; then
  echo "[test-d2-upstream] reusing $VENV"
  "$VENV/bin/python" -m pip install -q "${REQS[@]/#/-r}"
else
  build
fi
"$VENV/bin/python" -m pip check  # detectron2's own requirements hold with the pins
flock -u 9
echo "[test-d2-upstream] $("$VENV/bin/python" -c 'import sys, numpy, torch, detectron2
print("Python", sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__,
      "detectron2", detectron2.__version__)')"

PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  "${TESTS[@]}" "$@"

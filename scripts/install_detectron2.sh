#!/usr/bin/env bash
# Install detectron2 into the given virtual environment.
#
# 1. Upstream (its documented install): build from the GitHub source at a pinned commit.
#    Used when github.com answers within $M2_D2_PROBE_TIMEOUT seconds.
# 2. Fallback, Python 3.11 only: the PyPI copy `pb1-detectron2==0.6` (upstream v0.6's Python
#    files without the C++ sources). A plain `pip install` of it fails while building
#    `detectron2._C`, so the script downloads the hash-checked sdist, installs its Python package
#    without the extension, and pins the numpy/Pillow/setuptools that v0.6 needs (numpy 1.23,
#    which has no wheels for Python 3.12+). `m2_detectron2` then provides a pure-Python stand-in
#    for `detectron2._C` whose C++-only ops raise a clear error.
# 3. A local Detectron2 source (a tree with setup.py, or a .tar.gz of one): built with its C++
#    ops, as path 1 does from GitHub.
#
# Environment: M2_D2_SOURCE=auto|github|pypi|<source tree or .tar.gz> (default auto).
set -euo pipefail
VENV=${1:-.venv}
PIP="$VENV/bin/pip"
PY="$VENV/bin/python"
D2_REPO=https://github.com/facebookresearch/detectron2.git
D2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833  # upstream main, 2026-06-06
SOURCE=${M2_D2_SOURCE:-auto}
HERE=$(cd "$(dirname "$0")/.." && pwd)

if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "[install_detectron2] detectron2 already installed: $("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)')"
  exit 0
fi

github_reachable() {
  timeout "${M2_D2_PROBE_TIMEOUT:-20}" git ls-remote --exit-code "$D2_REPO" HEAD >/dev/null 2>&1
}

# A source build runs setup.py in this environment (it imports torch), so it needs setuptools,
# which venvs of Python 3.12+ no longer bring: when none is there, the version that
# requirements/detectron2-upstream.txt pins.
need_setuptools() {
  "$PY" -c 'import setuptools' 2>/dev/null || "$PIP" install "setuptools==79.0.1"
}

case "$SOURCE" in
  auto|github|pypi) ;;
  *)
    [[ -e "$SOURCE" ]] || { echo "[install_detectron2] M2_D2_SOURCE=$SOURCE: expected auto," \
      "github, pypi or a Detectron2 source tree or .tar.gz" >&2; exit 2; }
    echo "[install_detectron2] building detectron2 from $SOURCE"
    need_setuptools
    "$PIP" install --no-build-isolation "$(realpath "$SOURCE")"
    "$PY" -c "import detectron2; print('[install_detectron2] installed detectron2', detectron2.__version__)"
    exit 0 ;;
esac

if [[ "$SOURCE" == github || ( "$SOURCE" == auto && $(github_reachable && echo yes || echo no) == yes ) ]]; then
  echo "[install_detectron2] building upstream detectron2 @ $D2_COMMIT from GitHub"
  need_setuptools
  "$PIP" install --no-build-isolation "git+$D2_REPO@$D2_COMMIT"
  exit 0
fi

if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "[install_detectron2] GitHub not reachable, and the PyPI copy of Detectron2 v0.6 needs" \
    "numpy 1.23 (Python 3.11 only; this is Python $("$PY" -c 'import platform; print(platform.python_version())')):" \
    "set M2_D2_SOURCE to a Detectron2 source tree or .tar.gz (e.g. commit ${D2_COMMIT:0:7})" >&2
  exit 2
fi
echo "[install_detectron2] GitHub not reachable: installing the PyPI copy pb1-detectron2==0.6 (no C++ ops)"
"$PIP" install -r "$HERE/requirements/detectron2-v0.6.txt"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Metadata generation imports torch, hence --no-build-isolation (torch is already in the venv).
"$PIP" download --no-deps --no-binary :all: --no-build-isolation --require-hashes \
  -r "$HERE/requirements/detectron2-sdist.txt" -d "$TMP"
tar -xzf "$TMP"/pb1-detectron2-0.6.tar.gz -C "$TMP"
SRC="$TMP/pb1-detectron2-0.6"
# The sdist has no detectron2/layers/csrc: drop the extension module instead of failing on it.
sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$SRC/setup.py"
grep -q 'ext_modules=\[\],' "$SRC/setup.py"
"$PIP" install --no-deps --no-build-isolation "$SRC"
"$PY" -c "import detectron2; print('[install_detectron2] installed detectron2', detectron2.__version__)"

#!/usr/bin/env bash
# Create .venv (when missing) and install everything the project needs, pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --disable-pip-version-check -q -r requirements/base.txt
bash scripts/install_detectron2.sh "$VENV"
"$VENV/bin/pip" install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
touch "$VENV/.installed"
echo "[install] done: $("$VENV/bin/python" -c 'import torch, timm, detectron2; print("torch", torch.__version__, "timm", timm.__version__, "detectron2", detectron2.__version__)')"

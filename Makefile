VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-d2-upstream install clean gpu-check

$(STAMP): requirements/base.txt requirements/detectron2-v0.6.txt scripts/install.sh scripts/install_detectron2.sh pyproject.toml
	bash scripts/install.sh

install: $(STAMP)

# `make demo SEED=n` seeds pretraining and both detectors. DEMO_BUDGET: quick (240 pretraining
# steps), full (3000, bf16 on CPUs with bf16) or auto (full on CUDA, quick on CPU). Output goes
# to demo_output[/full][/seed<n>] unless DEMO_OUT is given, so that runs sit side by side.
SEED ?= 0
DEMO_BUDGET ?= auto
DEMO_OUT ?=

demo: $(STAMP)
	$(PY) -m m2_detectron2.demo --seed $(SEED) --budget $(DEMO_BUDGET) $(if $(DEMO_OUT),--output-dir $(DEMO_OUT))

test: $(STAMP)
	$(PY) -m pytest -q tests

# The whole suite in the modern environment: Python 3.12, numpy 2 and Detectron2 built from a
# source tree or .tar.gz, in a scratch venv outside the repository
# (${M2_SCRATCH:-/tmp}/m2-d2-upstream/<hash>), built once. TESTS: pytest arguments (default tests).
TESTS ?=
test-d2-upstream:
	@test -n "$(D2_SRC)" || { echo "usage: make test-d2-upstream D2_SRC=<detectron2 source tree or .tar.gz>" >&2; exit 2; }
	bash scripts/test_d2_upstream.sh "$(D2_SRC)" $(TESTS)

clean:
	rm -rf $(VENV) build *.egg-info demo_output

# Fashion-MNIST (Debian's dataset-fashion-mnist) for the learning-quality benchmark.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
$(FMNIST):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

.PHONY: benchmark-quality
benchmark-quality: $(STAMP) $(FMNIST)
	$(PY) benchmarks/learning_quality.py

# Teacher-target noise over batch compositions (BN groups, Momentum BN alpha, SyncBN, eval BN)
# and along a BN/BN and a BN/Momentum BN run; regenerates benchmarks/results/target_noise*.
.PHONY: benchmark-noise
benchmark-noise: $(STAMP) $(FMNIST)
	$(PY) benchmarks/target_noise.py --force

# One GPU check (at most 9 minutes on one H100/H200, step caps within the budget): CUDA tests,
# speed.py eager and --real at ResNet-50 224 px and ResNet-18 96 px, --compile at ResNet-18;
# JSON and a table under
# benchmarks/results/gpu_check_<date>/. GPU_PY: a Python with torch, torchvision and timm.
GPU_PY ?= python3
gpu-check:
	bash scripts/gpu_check.sh --python $(GPU_PY)

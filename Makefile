VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean gpu-check

$(STAMP): requirements/base.txt requirements/detectron2-v0.6.txt scripts/install.sh scripts/install_detectron2.sh pyproject.toml
	bash scripts/install.sh

install: $(STAMP)

# `make demo SEED=n` seeds pretraining and both detectors; seeds other than 0 write to
# demo_output/seed<n> so that runs sit side by side.
SEED ?= 0
DEMO_OUT ?= $(if $(filter 0,$(SEED)),demo_output,demo_output/seed$(SEED))

demo: $(STAMP)
	$(PY) -m m2_detectron2.demo --seed $(SEED) --output-dir $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info demo_output

# Fashion-MNIST (Debian's dataset-fashion-mnist) for the learning-quality benchmark.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
$(FMNIST):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

.PHONY: benchmark-quality
benchmark-quality: $(STAMP) $(FMNIST)
	$(PY) benchmarks/learning_quality.py

# One GPU check (about 9 minutes on one H100/H200): CUDA tests, speed.py eager / --real /
# --compile at ResNet-50 224 px and ResNet-18 96 px; JSON and a table under
# benchmarks/results/gpu_check_<date>/. GPU_PY: a Python with torch, torchvision and timm.
GPU_PY ?= python3
gpu-check:
	bash scripts/gpu_check.sh --python $(GPU_PY)

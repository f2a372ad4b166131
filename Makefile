# The two commands of the README:
#   make quickstart   install, generate the shapes dataset, train shapes_tiny.py on the CPU, evaluate,
#                     then draw the trained model's detections on a few validation images
#   make test         install, lint, run the whole test suite, build-check the CUDA kernel
# Both install into ./.venv once; the install is skipped while its inputs are unchanged. The
# quickstart installs only the core (requirements-core.txt); `make install` adds the extras.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detrkit-installed
CORE_STAMP := $(VENV)/.detrkit-core-installed
EXT_SOURCES := $(shell find detrkit/csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)

# The CUDA build check uses the registry's CUDA build of torch in a separate environment; the
# machine's pip config points at a local CPU wheel, so that config is switched off for it.
# It runs where a CUDA toolkit is found (CUDA_HOME, else /usr/local/cuda-13.0, /usr/local/cuda,
# else the nvcc on PATH) and is skipped, saying so, where there is none.
CUDA_VENV := .venv-cuda
CUDA_STAMP := $(CUDA_VENV)/.torch-installed
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda) \
	$(patsubst %/bin/nvcc,%,$(shell command -v nvcc 2>/dev/null)))
NVCC := $(if $(CUDA_HOME),$(wildcard $(CUDA_HOME)/bin/nvcc))
# Every architecture family nvcc knows from sm_75 on, plus PTX of the newest
# (tools/check_cuda_build.py --arch-list says why); with nvcc 13.0: 7.5;8.0;9.0;10.0;11.0;12.0+PTX
TORCH_CUDA_ARCH_LIST ?= $(shell $(PYTHON) tools/check_cuda_build.py --arch-list --nvcc $(NVCC))

.PHONY: install install-core quickstart test test-fast cuda-check lint format clean

install: $(STAMP)

install-core: $(CORE_STAMP)

# The core: torch and the few packages training, evaluation and the demo import, then the package
# itself, which compiles detrkit._C against that torch.
$(CORE_STAMP): requirements-core.txt pyproject.toml setup.py $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-core.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(CORE_STAMP)

# Everything else: the optional extras and the test tools, so that every test runs.
$(STAMP): $(CORE_STAMP) requirements.txt
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

QUICKSTART_CONFIG := projects/deformable_detr/configs/shapes_tiny.py
QUICKSTART_OUTPUT := output/shapes_tiny

quickstart: install-core
	$(PY) tools/train_net.py --config-file $(QUICKSTART_CONFIG)
	$(PY) demo/demo.py --config-file $(QUICKSTART_CONFIG) \
		--input "$${DETRKIT_DATASETS:-datasets}/shapes/val/val_00000[1-4].jpg" \
		--output $(QUICKSTART_OUTPUT)/demo --show-sampling-points \
		train.init_checkpoint=$(QUICKSTART_OUTPUT)/model_final.pth

test: install
	$(MAKE) lint
	$(PY) -m pytest -q tests
	$(MAKE) cuda-check

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

$(CUDA_STAMP):
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(CUDA_VENV)/bin/python -m pip install --quiet \
		torch==2.13.0 setuptools wheel ninja numpy
	touch $(CUDA_STAMP)

# Compile and link detrkit._C with the CUDA kernel for every architecture of
# TORCH_CUDA_ARCH_LIST, then load it, check the CUDA dispatch entries and that the fatbinary
# holds those cubins and PTX. Runs on machines without a GPU; needs nvcc.
ifeq ($(NVCC),)
cuda-check:
	@echo "cuda-check: skipped: no nvcc found (looked in CUDA_HOME='$(CUDA_HOME)'; with" \
		"CUDA_HOME unset, also in /usr/local/cuda-13.0, /usr/local/cuda and on PATH), so the" \
		"CUDA kernel was not build-checked. Set CUDA_HOME to a CUDA toolkit to run it."
else
cuda-check: $(CUDA_STAMP)
	CUDA_HOME=$(CUDA_HOME) FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=2 \
		NVCC_APPEND_FLAGS="--threads 2" \
		$(CUDA_VENV)/bin/python setup.py --quiet build_ext --build-temp build-cuda/temp --build-lib build-cuda/lib
	TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" $(CUDA_VENV)/bin/python tools/check_cuda_build.py \
		build-cuda/lib --nvcc $(NVCC)
endif

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf build build-cuda *.egg-info detrkit/_C*.so

# The two commands of the README:
#   make quickstart   install, generate the shapes dataset, train shapes_tiny.py on the CPU, evaluate,
#                     then draw the trained model's detections on a few validation images
#   make test         install, lint, run the whole test suite, build-check the CUDA kernel
# Both install into ./.venv once; the install is skipped while its inputs are unchanged.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detrkit-installed
EXT_SOURCES := $(shell find detrkit/csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)

# The CUDA build check uses the registry's CUDA build of torch in a separate environment; the
# machine's pip config points at a local CPU wheel, so that config is switched off for it.
CUDA_VENV := .venv-cuda
CUDA_STAMP := $(CUDA_VENV)/.torch-installed
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: install quickstart test test-fast cuda-check lint format clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

QUICKSTART_CONFIG := projects/deformable_detr/configs/shapes_tiny.py
QUICKSTART_OUTPUT := output/shapes_tiny

quickstart: install
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

# Compile and link detrkit._C with the CUDA kernel against torch's CUDA build, then load it and
# check that the CUDA dispatch entries exist. Runs on machines without a GPU.
cuda-check: $(CUDA_STAMP)
	CUDA_HOME=$(CUDA_HOME) FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=2 \
		$(CUDA_VENV)/bin/python setup.py --quiet build_ext --build-temp build-cuda/temp --build-lib build-cuda/lib
	TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" $(CUDA_VENV)/bin/python tools/check_cuda_build.py build-cuda/lib

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf build build-cuda *.egg-info detrkit/_C*.so

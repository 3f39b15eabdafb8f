# Entry points. On a fresh machine:
#   make demo   set up .venv (pinned requirements + zerocomm built), train the demo on 2 ranks
#   make test   same setup, then the C++ unit tests (ctest) and the pytest suite
#   make smoke  same setup, then only the smoke subset ($(SMOKE_TESTS))
#   make smoke-oldest  a second venv (.venv-oldest) with the oldest supported
#               torch ($(OLDEST_TORCH)), zerocomm installed into it with
#               `pip install --no-build-isolation .` (a copy of the tree), then
#               the smoke subset there; CI runs it
#   make gpu-check  on a GPU machine: build + the GPU acceptance suite into
#               $(GPU_OUT) (benchmarks/gpu_suite.sh: an archive + summary.json;
#               unpack into benchmarks/results/gpu/ to commit, see the script)
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
CMAKE ?= cmake
CTEST ?= ctest
BUILD_DIR ?= cmake-build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Extra -D options for the CMake configure, e.g. CMAKE_ARGS=-DZEROCOMM_CUDA=ON
CMAKE_ARGS ?=
SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu) setup.py requirements.txt

export CUDA_HOME

# Ninja when available; only chosen for a fresh build dir, so an existing one
# keeps the generator it was made with.
CMAKE_GENERATOR_ARG = $(if $(wildcard $(BUILD_DIR)/CMakeCache.txt),,$(if $(wildcard $(VENV)/bin/ninja),-G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja,))

.PHONY: setup build demo ctest test smoke smoke-oldest lint gpu-check gpu-check-dry-run clean

# The smoke subset: the build's torch check, flatten, a 2-rank attach + step
# in both modes and a checkpoint round trip (tests/test_smoke.py docstring).
SMOKE_TESTS := tests/test_build.py tests/test_smoke.py
# The oldest torch of the supported range (pyproject.toml), for smoke-oldest.
OLDEST_TORCH ?= 2.11.0
OLDEST_VENV ?= .venv-oldest

# The virtual environment with the pinned requirements (torch==2.14.1 comes
# from the machine's local package cache) and zerocomm._C built against it.
$(VENV)/.built: $(SOURCES)
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	CUDA_HOME=$(CUDA_HOME) $(VENV)/bin/pip install -v --no-build-isolation -e . > $(VENV)/build.log 2>&1 \
	  || { tail -50 $(VENV)/build.log; exit 1; }
	grep -E "zerocomm: building" $(VENV)/build.log
	touch $@

setup: $(VENV)/.built

build: setup

demo: setup
	$(PYTHON) -m zerocomm.demo

# C++ stream/event tests: CPU sources only (ZEROCOMM_CUDA=OFF), fast on 2 cores.
ctest: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(CMAKE) -S . -B $(BUILD_DIR) $(CMAKE_GENERATOR_ARG) \
	  -DZEROCOMM_PYTHON="$(abspath $(PYTHON))" -DZEROCOMM_CUDA=OFF $(CMAKE_ARGS)
	$(CMAKE) --build $(BUILD_DIR) --parallel $(JOBS)
	$(CTEST) --test-dir $(BUILD_DIR) --output-on-failure

test: ctest
	$(PYTHON) -m pytest -q

smoke: setup
	$(PYTHON) -m pytest -q $(SMOKE_TESTS)

# Installed (not editable) from a copy of the tracked tree, so the build
# neither rewrites zerocomm/_build_meta.py here (the .venv build's) nor puts
# a build/ folder here. pytest runs in the copy through its entry point,
# which (unlike `python -m pytest`) does not put the current folder on
# sys.path: the tests import the installed package, not the copy's sources.
smoke-oldest:
	test -x $(OLDEST_VENV)/bin/python || python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/pip install -q torch==$(OLDEST_TORCH) pybind11 ninja setuptools wheel pytest numpy
	rm -rf $(OLDEST_VENV)/src && mkdir -p $(OLDEST_VENV)/src
	git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t $(OLDEST_VENV)/src
	cd $(OLDEST_VENV)/src && CUDA_HOME=$(CUDA_HOME) ../bin/pip install -v --no-build-isolation . > ../build.log 2>&1 \
	  || { tail -50 ../build.log; exit 1; }
	grep -E "zerocomm: building" $(OLDEST_VENV)/build.log
	cd $(OLDEST_VENV) && bin/python -c "import json, zerocomm; print(zerocomm.__file__, json.dumps(zerocomm.build_info())); \
	  assert 'site-packages' in zerocomm.__file__"
	cd $(OLDEST_VENV)/src && ../bin/pytest -q -p no:cacheprovider $(SMOKE_TESTS)

# One GPU, one device call: <= 540 s worst case including the build (in
# place, CUDA required). Uses $(PYTHON) when it exists, else python3.
GPU_OUT ?= benchmarks/out/gpu
gpu-check:
	ZEROCOMM_PY=$(if $(wildcard $(PYTHON)),$(abspath $(PYTHON)),python3) benchmarks/gpu_suite.sh $(GPU_OUT)

# The suite's CPU check (structure, time budget, collection, packing, CPU
# error paths): CI runs it.
gpu-check-dry-run: setup
	ZEROCOMM_PY=$(abspath $(PYTHON)) benchmarks/gpu_suite.sh --dry-run benchmarks/out/gpu-dry-run

# Style and types: ruff (lint + format) on the Python tree, mypy on zerocomm/ (against
# zerocomm/_C.pyi), clang-format on csrc/. The same checks run from
# .pre-commit-config.yaml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/clang-format --dry-run -Werror csrc/*.h csrc/*.cpp csrc/*.cu csrc/tests/*.cpp

clean:
	rm -rf $(BUILD_DIR) build *.egg-info .pytest_cache
	rm -f zerocomm/_C*.so zerocomm/_build_meta.py
	find zerocomm tests benchmarks -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true

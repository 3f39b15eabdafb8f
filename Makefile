# Developer entry points. `make test` = C++ unit tests (ctest) + pytest.
PYTHON ?= python
CUDA_HOME ?= /usr/local/cuda
CMAKE ?= cmake
CTEST ?= ctest
BUILD_DIR ?= cmake-build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Extra -D options for the CMake configure, e.g. CMAKE_ARGS=-DZEROCOMM_ALL_SOURCES=ON
CMAKE_ARGS ?=

export CUDA_HOME

# Ninja when available; only chosen for a fresh build dir, so an existing one
# keeps the generator it was made with.
CMAKE_GENERATOR_ARG := $(if $(wildcard $(BUILD_DIR)/CMakeCache.txt),,$(if $(shell command -v ninja 2>/dev/null),-G Ninja,))

.PHONY: build ctest test clean

# The Python extension zerocomm._C, built against the installed torch.
build:
	CUDA_HOME=$(CUDA_HOME) $(PYTHON) -m pip install --no-build-isolation -e .

# C++ stream/event tests: CPU sources only (ZEROCOMM_CUDA=OFF), fast on 2 cores.
ctest:
	$(CMAKE) -S . -B $(BUILD_DIR) $(CMAKE_GENERATOR_ARG) \
	  -DZEROCOMM_PYTHON="$$(command -v $(PYTHON))" -DZEROCOMM_CUDA=OFF $(CMAKE_ARGS)
	$(CMAKE) --build $(BUILD_DIR) --parallel $(JOBS)
	$(CTEST) --test-dir $(BUILD_DIR) --output-on-failure

test: ctest
	$(PYTHON) -m pytest -q

clean:
	rm -rf $(BUILD_DIR) build *.egg-info .pytest_cache
	rm -f zerocomm/_C*.so zerocomm/_build_meta.py
	find zerocomm tests benchmarks -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true

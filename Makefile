# ddpm-lightning: common jobs. PYTHON is the interpreter of the environment you installed into.
PYTHON ?= python
DATA ?= data

.PHONY: install test test-fast lint format train-mnist train-mnist-conditional tensorboard clean

install:  ## install the package with its test tools (torch pinned in pyproject.toml)
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## everything CI runs, slow tests included
	$(PYTHON) -m pytest -q

test-fast:  ## skip the tests marked slow while iterating
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check ddpm_lightning tests
	$(PYTHON) -m ruff format --check ddpm_lightning tests

format:
	$(PYTHON) -m ruff format ddpm_lightning tests
	$(PYTHON) -m ruff check --fix ddpm_lightning tests

train-mnist:  ## unconditional MNIST; DATA=../shared/data to use a local copy
	ddpm fit --config configs/mnist.yaml --data.root $(DATA)

train-mnist-conditional:
	ddpm fit --config configs/mnist_conditional.yaml --data.root $(DATA)

tensorboard:
	tensorboard --logdir lightning_logs

clean:
	rm -rf lightning_logs/version_* .pytest_cache .ruff_cache

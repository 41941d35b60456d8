# ddpm-lightning: common jobs. PYTHON is the interpreter of the environment you installed into.
PYTHON ?= python
DATA ?= data

.PHONY: install test test-fast lint format bench experiments experiments-report train-mnist train-mnist-conditional tensorboard demo demo-screenshot clean test-scale slurm-up slurm-down

install:  ## install the package with its test tools (torch pinned in pyproject.toml)
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## everything CI runs, slow tests included
	$(PYTHON) -m pytest -q

test-fast:  ## skip the tests marked slow while iterating
	$(PYTHON) -m pytest -q -m "not slow"

test-scale:  ## DDP, torchrun and SLURM launches, exact resume, failure modes (tests/test_scale.py)
	$(PYTHON) -m pytest -q tests/test_scale.py

slurm-up:  ## a two-node SLURM cluster on this machine (as root; installs slurm-wlm and munge when missing)
	scripts/slurm_cluster.sh start

slurm-down:
	scripts/slurm_cluster.sh stop

lint:
	$(PYTHON) -m ruff check ddpm_lightning tests benchmarks experiments
	$(PYTHON) -m ruff format --check ddpm_lightning tests benchmarks experiments

format:
	$(PYTHON) -m ruff format ddpm_lightning tests benchmarks experiments
	$(PYTHON) -m ruff check --fix ddpm_lightning tests benchmarks experiments

bench:  ## ours vs diffusers and denoising-diffusion-pytorch (`pip install -e ".[bench]"`), then each speed switch before/after; writes BENCHMARKS.md and benchmarks/ABLATIONS.md
	$(PYTHON) -m benchmarks.bench --output BENCHMARKS.md $(BENCH_ARGS)
	$(PYTHON) -m benchmarks.ablate --output benchmarks/ABLATIONS.md $(ABLATE_ARGS)

experiments:  ## train, evaluate and report every study of experiments/studies (DATA=../shared/data; see experiments/README.md)
	$(PYTHON) -m experiments.run --data_root $(DATA) --jobs 2 $(STUDIES)

experiments-report:  ## rebuild experiments/REPORT.md from the saved results (no training, no sampling)
	$(PYTHON) -m experiments.run --report_only $(STUDIES)

train-mnist:  ## unconditional MNIST; DATA=../shared/data to use a local copy
	ddpm fit --config configs/mnist.yaml --data.root $(DATA)

train-mnist-conditional:
	ddpm fit --config configs/mnist_conditional.yaml --data.root $(DATA)

tensorboard:
	tensorboard --logdir lightning_logs

CKPT ?= lightning_logs/version_0/checkpoints/last.ckpt

demo:  ## the web page over a checkpoint on http://127.0.0.1:7860 (needs the demo extra); CKPT=path/to/last.ckpt
	ddpm demo --ckpt_path $(CKPT)

demo-screenshot:  ## re-take docs/demo.png in headless chromium, over CKPT if it exists (else a tiny test model)
	DDPM_DEMO_SCREENSHOT=docs/demo.png DDPM_DEMO_CKPT=$(wildcard $(CKPT)) $(PYTHON) -m pytest -q tests/test_demo.py -k screenshot

clean:
	rm -rf lightning_logs/version_* .pytest_cache .ruff_cache

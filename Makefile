# ddpm-lightning: common jobs. PYTHON is the interpreter of the environment you installed into.
PYTHON ?= python
DATA ?= data

.PHONY: install install-keep-torch constraints gpu-check test test-fast lint format bench experiments experiments-report train-mnist train-mnist-conditional tensorboard demo demo-screenshot clean test-scale slurm-up slurm-down

install:  ## the package and its test tools, at CI's exact versions (constraints/ci.txt; pyproject.toml has the ranges)
	$(PYTHON) -m pip install -e ".[dev]" -c constraints/ci.txt
	$(PYTHON) -m pip install --no-deps k-diffusion -c constraints/ci.txt  # the tests' reference; see pyproject's test extra

install-keep-torch:  ## into an environment with its own torch (a cluster's CUDA build), never replacing it, ending in a working ddpm; EXTRAS=bench
	PYTHON=$(PYTHON) scripts/install_keep_torch.sh $(EXTRAS)

constraints:  ## rewrite constraints/ci.txt from this environment (run in the CI environment after an upgrade)
	$(PYTHON) scripts/freeze_constraints.py

test:  ## everything CI runs, slow tests included (the 25 slowest are listed at the end: the suite's budget is ~15 min)
	$(PYTHON) -m pytest -q --durations=25

test-fast:  ## skip the tests marked slow while iterating
	$(PYTHON) -m pytest -q -m "not slow"

test-scale:  ## presets and bf16, DDP, torchrun and SLURM launches, exact resume, atomic checkpoints, failure modes
	$(PYTHON) -m pytest -q tests/test_presets.py tests/test_ddp.py tests/test_launchers.py tests/test_resume.py \
	    tests/test_atomic_checkpoints.py tests/test_failures.py

gpu-check:  ## CUDA + its own torch: install keeping torch, bf16 fit, DDP fit, bench; GPU_CHECK_ARGS="--data-root DIR"
	PYTHON=$(PYTHON) scripts/gpu_check.sh $(GPU_CHECK_ARGS)

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

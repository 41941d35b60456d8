"""Exact resume: a run SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` ends bitwise equal to the
uninterrupted run."""

from __future__ import annotations

import signal
import subprocess

import pytest
from scaleout import (
    PY,
    assert_same_training_state,
    load_ckpt,
    only_run_dir,
    recipe_args,
    subprocess_env,
    tail,
    write_fragment,
)

from ddpm_lightning.cli import build_cli


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_last_equals_the_uninterrupted_run(shared_data, tmp_path, monkeypatch):
    """2 epochs x 6 steps, a checkpoint every 3 steps; the run is SIGKILLed before step 4 (mid-epoch 0) and resumed
    with ``--ckpt_path last`` (from the newest earlier run). Everything matches the uninterrupted run bitwise:
    float ops on CPU are deterministic, and the resume restores data order, RNG, optimizer, schedulers and EMA."""
    fragment = write_fragment(tmp_path / "run.yaml", shared_data, steps_per_epoch=6, epochs=2, ckpt_every=3)
    # dropout 0.1, per-step warm-up and linear decay, and a StepLR per epoch chained after them
    step_lr = "--model.lr_scheduler={class_path: torch.optim.lr_scheduler.StepLR, "
    step_lr += "init_args: {step_size: 1, gamma: 0.5}}"
    args = ["fit", *recipe_args("mnist.yaml", fragment), step_lr, "--model.lr_scheduler_interval=epoch"]

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    monkeypatch.chdir(reference_dir)
    build_cli(args)
    reference = load_ckpt(only_run_dir(reference_dir) / "checkpoints" / "last.ckpt")

    kill = "--trainer.callbacks+={class_path: scaleout.KillAt, init_args: {step: 4}}"
    cmd, env = [PY, "-m", "ddpm_lightning.cli", *args, kill], subprocess_env()
    proc = subprocess.run(cmd, cwd=killed_dir, env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, tail(proc)
    interrupted = load_ckpt(only_run_dir(killed_dir) / "checkpoints" / "last.ckpt")
    assert (interrupted["global_step"], interrupted["epoch"]) == (3, 0)  # mid-epoch

    monkeypatch.chdir(killed_dir)
    build_cli([*args, "--ckpt_path=last"])  # a new version_1 run, resuming from version_0's last.ckpt
    resumed = load_ckpt(killed_dir / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")

    assert (resumed["global_step"], resumed["epoch"]) == (reference["global_step"], reference["epoch"]) == (12, 1)
    assert_same_training_state(resumed, reference)

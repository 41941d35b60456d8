"""A checkpoint of the last completed step at every stop: ``max_steps`` and ``max_time`` mid-epoch, early stopping,
SIGTERM, SLURM's SIGUSR1 + SIGTERM, Ctrl-C. Each leaves ``last.ckpt`` at the step where it stopped, says so in its
closing log line, and ``--ckpt_path last`` from it ends bitwise equal to the uninterrupted run (2 epochs x 6 steps).

The signals are real: the CLI runs in a subprocess and a probe sends the signal to it before a given step."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from scaleout import (
    PY,
    assert_same_training_state,
    callback,
    load_ckpt,
    only_run_dir,
    recipe_args,
    subprocess_env,
    tail,
    write_fragment,
)

from ddpm_lightning.cli import build_cli

pytestmark = pytest.mark.slow  # a dozen in-process and subprocess runs of the tiny model, ~10 s each

STEPS_PER_EPOCH, EPOCHS = 6, 2


def _args(tmp: Path, *extra_callbacks: dict) -> list[str]:
    """The run: the MNIST recipe, tiny model, 2 x 6 steps; ModelCheckpoint saves last.ckpt only beside a save every
    100 steps, i.e. Lightning itself would not write the mid-epoch stops."""
    fragment = write_fragment(
        tmp / f"run{len(list(tmp.glob('run*.yaml')))}.yaml",
        SHARED_DATA,
        steps_per_epoch=STEPS_PER_EPOCH,
        epochs=EPOCHS,
        ckpt_every=100,
        extra_callbacks=extra_callbacks,
    )
    return ["fit", *recipe_args("mnist.yaml", fragment)]


def _fit(cwd: Path, args: list[str]) -> None:
    old = Path.cwd()
    os.chdir(cwd)
    try:
        build_cli(args)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def reference(shared_data, tmp_path_factory) -> dict:
    """The uninterrupted run's last.ckpt (step 12, at the end of epoch 1)."""
    cwd = tmp_path_factory.mktemp("reference")
    _fit(cwd, _args(cwd))
    ckpt = load_ckpt(only_run_dir(cwd) / "checkpoints" / "last.ckpt")
    assert (ckpt["global_step"], ckpt["epoch"]) == (STEPS_PER_EPOCH * EPOCHS, EPOCHS - 1)
    return ckpt


def _stopped_at(cwd: Path, step: int) -> dict:
    ckpt = load_ckpt(only_run_dir(cwd) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == step
    return ckpt


def _resume_matches(cwd: Path, reference: dict, *overrides: str) -> None:
    """``--ckpt_path last`` in the stopped run's folder (a new version_1) ends exactly as the uninterrupted run."""
    _fit(cwd, [*_args(cwd), "--ckpt_path=last", *overrides])
    resumed = load_ckpt(cwd / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")
    assert_same_training_state(resumed, reference)


def _run_cli(cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "ddpm_lightning.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=240)


def _closing_line(proc: subprocess.CompletedProcess, cwd: Path, step: int) -> str:
    path = (only_run_dir(cwd) / "checkpoints" / "last.ckpt").resolve()
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if f"final checkpoint (step {step}): " in line]
    assert lines and lines[-1].endswith(str(path)), tail(proc)
    return lines[-1]


def test_every_model_checkpoint_with_save_last_gets_the_final_step(tmp_path):
    """A second ModelCheckpoint (as the experiments runner adds one with its own folder) keeps its last.ckpt at the
    final step too, not at its own last save (step 4 here)."""
    other = tmp_path / "runner_ckpts"
    second = callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath=str(other), save_last=True)
    second["init_args"] |= {"every_n_train_steps": 4, "save_top_k": -1, "filename": "{step:06d}"}
    _fit(tmp_path, [*_args(tmp_path, second), "--trainer.max_steps=9"])
    assert _stopped_at(tmp_path, 9)["epoch"] == 1
    assert load_ckpt(other / "last.ckpt")["global_step"] == 9
    assert sorted(p.name for p in other.glob("step=*.ckpt")) == ["step=000004.ckpt", "step=000008.ckpt"]  # its own


def test_max_steps_mid_epoch_writes_last_and_resumes_exactly(reference, tmp_path):
    """max_steps 9 stops 3 steps into epoch 1 (ModelCheckpoint alone would keep the step-12-less state of nothing)."""
    _fit(tmp_path, [*_args(tmp_path), "--trainer.max_steps=9"])
    ckpt = _stopped_at(tmp_path, 9)
    assert ckpt["epoch"] == 1
    _resume_matches(tmp_path, reference, "--trainer.max_steps=-1")


def test_max_time_mid_epoch_writes_last_and_resumes_exactly(reference, tmp_path):
    """The max_time Timer runs out at step 8 (made to, by the probe): last.ckpt holds step 8."""
    _fit(tmp_path, [*_args(tmp_path, callback("scaleout.ExpireTimerAt", step=7)), "--trainer.max_time=00:01:00:00"])
    _stopped_at(tmp_path, 8)
    _resume_matches(tmp_path, reference)  # no max_time: the Timer's state in the checkpoint is left unused


def test_early_stopping_writes_last_at_its_epoch_end_and_resumes_exactly(reference, tmp_path):
    """EarlyStopping stops after epoch 0's validation (step 6); ModelCheckpoint (every 100 steps) wrote nothing."""
    stop = callback("lightning.pytorch.callbacks.EarlyStopping", monitor="val/loss", stopping_threshold=1e9)
    _fit(tmp_path, _args(tmp_path, stop))
    assert _stopped_at(tmp_path, STEPS_PER_EPOCH)["epoch"] == 0
    _resume_matches(tmp_path, reference)


@pytest.mark.parametrize(
    ("signals", "returncode"),
    [
        (["SIGTERM"], 128 + signal.SIGTERM),  # scancel, a time limit without requeue, an eviction
        (["SIGINT"], 1),  # Ctrl-C (Lightning's graceful shutdown exits 1)
    ],
    ids=["sigterm", "ctrl-c"],
)
def test_signal_finishes_the_step_writes_last_and_resumes_exactly(reference, tmp_path, signals, returncode):
    """The signal arrives before step 8; step 8 completes, last.ckpt holds it, the closing line names it."""
    proc = _run_cli(tmp_path, _args(tmp_path, callback("scaleout.SignalAt", step=7, signals=signals)))
    assert proc.returncode == returncode, tail(proc)
    assert _stopped_at(tmp_path, 8)["epoch"] == 1
    _closing_line(proc, tmp_path, 8)
    _resume_matches(tmp_path, reference)


def test_slurm_requeue_signal_then_sigterm_writes_hpc_and_last(reference, tmp_path):
    """Under SLURM (auto-requeue), SIGUSR1 makes Lightning write hpc_ckpt_1.ckpt and call `scontrol requeue`; the
    SIGTERM that ends the job then writes last.ckpt at the end of the step, and the requeued start resumes from it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NAME="ddpm", SLURM_PROCID="0", SLURM_LOCALID="0")
    slurm.update(SLURM_NODEID="0", SLURM_NODELIST="127.0.0.1", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    probe = callback("scaleout.SignalAt", step=7, signals=["SIGUSR1", "SIGTERM"])
    proc = _run_cli(run_dir, [*_args(tmp_path, probe), "--trainer.accelerator=cpu"], **slurm)
    assert proc.returncode == 128 + signal.SIGTERM, tail(proc)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert load_ckpt(run_dir / "hpc_ckpt_1.ckpt")["global_step"] == 7  # written in the handler, before step 8
    _stopped_at(run_dir, 8)
    _closing_line(proc, run_dir, 8)
    _resume_matches(run_dir, reference)  # `last` is the newest of last.ckpt and hpc_ckpt_1.ckpt: last.ckpt


def test_sigterm_under_ddp_stops_every_rank_at_the_same_step(tmp_path):
    """Two CPU processes (Lightning's DDP launcher); SIGTERM reaches rank 0 before step 4, which forwards it to rank
    1 at whatever point rank 1 is. Both ranks agree to stop after step 4, write last.ckpt together and exit 143.
    (No handler runs a collective: Lightning's own broadcasts from inside the handler, which can pair with a gradient
    all-reduce and crash the run, depending on where each rank is when the signal lands.)"""
    probe = callback("scaleout.SignalAt", step=3, signals=["SIGTERM"], rank=0)
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    proc = _run_cli(tmp_path, [*_args(tmp_path, probe), *ddp])
    assert proc.returncode == 128 + signal.SIGTERM, tail(proc)
    assert _stopped_at(tmp_path, 4)["epoch"] == 0
    _closing_line(proc, tmp_path, 4)

"""Shared by the scale-out tests (test_presets, test_ddp, test_launchers, test_resume, test_failures): probes the
CLI's processes import, config fragments, and the runs of the CLI in subprocesses.

Multi-process runs go through the CLI in a subprocess: Lightning's DDP launcher re-runs the current script, which
must be the CLI, not pytest. The probes below run inside those processes as ``scaleout.RankProbe`` etc.
(``PYTHONPATH=tests``). Every run is the tiny U-Net (``TINY_MODEL_ARGS``) on the real MNIST files, a few steps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import ALL_CONFIGS, CONFIGS, REPO, TINY_MODEL_ARGS
from lightning.pytorch.callbacks import Callback, Timer

from ddpm_lightning.callbacks import EMA, SampleGrid
from ddpm_lightning.data import MNISTDataModule

PY = sys.executable
BIN = Path(sys.executable).parent  # the environment's scripts: ddpm, torchrun
RECIPES = [c for c in ALL_CONFIGS if not c.stem.startswith("classifier")]  # the DDPM recipes
REAL_DATA_RECIPES = [c for c in CONFIGS if c in RECIPES]
PRESETS = sorted((REPO / "configs" / "trainer").glob("*.yaml"))
SUBPROCESS_TIMEOUT = 240


# -- probes, importable in the CLI's processes -----------------------------------------------------------------------
class RankProbe(Callback):
    """Each rank writes what it saw (losses, labels, EMA and raw weights, its place) to ``out_dir/rank{R}.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.losses: list[float] = []
        self.labels: list[list[int]] = []
        self.params: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))  # this rank's loss (the logged one is the mean over ranks)
        self.labels.append(batch[1].tolist())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.params = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}  # raw weights here

    def on_train_end(self, trainer, pl_module) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        grid = next((cb.last_grid_path for cb in trainer.callbacks if isinstance(cb, SampleGrid)), None)
        env = getattr(trainer.strategy, "cluster_environment", None)
        record = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "world_size": trainer.world_size,
            "environment": type(env).__name__,
            "global_step": trainer.global_step,
            "losses": self.losses,
            "labels": self.labels,
            "params": self.params,
            "ema": {k: v.detach().clone() for k, v in ema._average_model.module.state_dict().items()},
            "grid": str(grid) if grid else None,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


class KillAt(Callback):
    """SIGKILL this process right before optimizer step ``step``: no handler, no cleanup, like a node failure."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(Callback):
    """Send this process ``signals`` (names: ``SIGTERM``, ``SIGINT``, ``SIGUSR1``) right before optimizer step
    ``step`` (on rank ``rank`` only, if given), through the real handlers: what ``scancel``, a Ctrl-C or SLURM's
    pre-timeout signal deliver."""

    def __init__(self, step: int, signals: list[str], rank: int | None = None) -> None:
        self.step = step
        self.signals = [signal.Signals[name] for name in signals]
        self.rank = rank  # only this rank's process (None: every rank's)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            for signum in self.signals:
                os.kill(os.getpid(), signum)


class ExpireTimerAt(Callback):
    """Make the ``max_time`` Timer's time run out at optimizer step ``step``: a time limit at a known step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            timer = next(cb for cb in trainer.callbacks if isinstance(cb, Timer))
            timer._offset = timer._duration  # as if the whole budget had been spent before this step


class PauseForRequeue(Callback):
    """On a SLURM job's first start, at ``step``, all ranks meet, rank 0 writes ``marker``, and all wait for the
    pre-timeout signal the test sends (Lightning checkpoints and requeues; SIGTERM then ends this start)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            return
        trainer.strategy.barrier("pause-for-requeue")  # no rank is inside a collective when the signal lands
        if trainer.is_global_zero:
            self.marker.write_text("ready")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not trainer.received_sigterm:
            time.sleep(0.1)  # the SIGUSR1 handler (hpc checkpoint + scontrol requeue) runs in here
        os._exit(0)


class CountingMNIST(MNISTDataModule):
    """MNIST that appends its pid to ``$DDPM_TEST_PREPARE_LOG`` whenever Lightning calls ``prepare_data``."""

    def prepare_data(self) -> None:
        with open(os.environ["DDPM_TEST_PREPARE_LOG"], "a") as f:
            f.write(f"{os.getpid()}\n")
        super().prepare_data()


class LossRecorder(Callback):
    """Keeps every training step's loss (in-process runs read it back from the trainer)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


# -- helpers ---------------------------------------------------------------------------------------------------------
def callback(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def write_fragment(
    path: Path,
    data_root: Path,
    *,
    steps_per_epoch: int = 4,
    epochs: int = 1,
    ckpt_every: int = 2,
    extra_callbacks: tuple[dict, ...] = (),
    data_class: str | None = None,
    **trainer,
) -> Path:
    """A second --config for any recipe: a short run, small grids, a checkpoint every ``ckpt_every`` steps."""
    callbacks = [
        callback("ddpm_lightning.callbacks.EMA", decay=0.9),
        callback(
            "ddpm_lightning.callbacks.SampleGrid",
            num_samples=4,
            samples_per_class=1,
            sampling={"num_steps": 2},
            trajectory_images=0,
        ),
        callback("lightning.pytorch.callbacks.ModelCheckpoint", save_last=True, every_n_train_steps=ckpt_every),
        *extra_callbacks,
    ]
    data: dict = {"init_args": {"root": str(data_root), "download": False, "batch_size": 16, "val_size": 64}}
    if data_class:
        data["class_path"] = data_class
    cfg = {
        "trainer": {
            "max_epochs": epochs,
            "max_steps": -1,  # the epochs above are the budget, whatever the recipe's own max_steps
            "limit_train_batches": steps_per_epoch,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "callbacks": callbacks,
            **trainer,
        },
        "data": data,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def recipe_args(recipe: str, fragment: Path) -> list[str]:
    return [f"--config={REPO / 'configs' / recipe}", f"--config={fragment}", *TINY_MODEL_ARGS]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(BIN), env.get("PATH", "")))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)  # 1 thread: as in this process (conftest)
    env.pop("DDPM_DEBUG", None)
    return env


def run_ok(cmd: list[str], cwd: Path, timeout: float = SUBPROCESS_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])}... exited {proc.returncode}:\n{tail(proc)}"
    return proc


def tail(proc: subprocess.CompletedProcess, lines: int = 40) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_ranks(out: Path, world: int) -> list[dict]:
    files = sorted(out.glob("rank*.pt"))
    assert [f.name for f in files] == [f"rank{r}.pt" for r in range(world)], files
    return [torch.load(f, weights_only=True) for f in files]


def assert_replicas_agree(ranks: list[dict]) -> None:
    """DDP keeps one model: raw and EMA weights bitwise equal on every rank; data differ (sharded)."""
    first = ranks[0]
    for other in ranks[1:]:
        for key in ("params", "ema"):
            assert first[key].keys() == other[key].keys()
            for name, value in first[key].items():
                assert torch.equal(value, other[key][name]), f"{key}.{name} differs between ranks"
        assert first["labels"] != other["labels"], "every rank saw the same batches: the data were not sharded"
    for r in ranks:
        assert r["losses"] and all(torch.isfinite(torch.tensor(r["losses"]))), r["losses"]


def only_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "lightning_logs").glob("version_*"))
    assert len(runs) == 1, f"one run directory expected (written by rank 0 only), found {runs}"
    return runs[0]


def load_ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def assert_same_training_state(resumed: dict, reference: dict) -> None:
    """Two checkpoints hold bitwise the same training: step, weights (raw and EMA), optimizer, schedulers, RNG."""
    assert (resumed["global_step"], resumed["epoch"]) == (reference["global_step"], reference["epoch"])
    for key in ("state_dict", "current_model_state", "averaging_state"):  # EMA weights, raw weights, n_averaged
        assert resumed[key].keys() == reference[key].keys()
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
    (opt_resumed,), (opt_reference,) = resumed["optimizer_states"], reference["optimizer_states"]
    assert opt_resumed["param_groups"] == opt_reference["param_groups"]
    for idx, state in opt_reference["state"].items():
        for name, value in state.items():
            assert torch.equal(opt_resumed["state"][idx][name], value), f"optimizer state {idx}.{name}"
    ema_state = next(v for k, v in reference["callbacks"].items() if k.startswith("EMA"))
    assert next(v for k, v in resumed["callbacks"].items() if k.startswith("EMA")) == ema_state
    assert torch.equal(resumed["rng_states"]["cpu"], reference["rng_states"]["cpu"])

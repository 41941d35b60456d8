"""Scale-out: trainer presets, bf16, DDP on CPU (gloo), torchrun and SLURM multi-node launches, preemption and exact
resume, atomic checkpoints, determinism, and failure modes (NaN loss, corrupt or malicious checkpoints).

Multi-process runs go through the CLI in a subprocess: Lightning's DDP launcher re-runs the current script, which
must be the CLI, not pytest. The probes below run inside those processes as ``test_scale.RankProbe`` etc.
(``PYTHONPATH=tests``). Every run is the tiny U-Net (``TINY_MODEL_ARGS``) on the real MNIST files, a few steps.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ALL_CONFIGS, CONFIGS, REPO, TINY_MODEL_ARGS
from lightning.pytorch.callbacks import Callback

from ddpm_lightning.callbacks import EMA, SampleGrid
from ddpm_lightning.checkpointing import AtomicCheckpointIO
from ddpm_lightning.cli import build_cli, main
from ddpm_lightning.data import MNISTDataModule
from ddpm_lightning.diffusion import GaussianDiffusion

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


# -- helpers ---------------------------------------------------------------------------------------------------------
def _callback(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def _fragment(
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
        _callback("ddpm_lightning.callbacks.EMA", decay=0.9),
        _callback(
            "ddpm_lightning.callbacks.SampleGrid", num_samples=4, samples_per_class=1, num_steps=2, trajectory_images=0
        ),
        _callback("lightning.pytorch.callbacks.ModelCheckpoint", save_last=True, every_n_train_steps=ckpt_every),
        *extra_callbacks,
    ]
    data: dict = {"init_args": {"root": str(data_root), "download": False, "batch_size": 16, "val_size": 64}}
    if data_class:
        data["class_path"] = data_class
    cfg = {
        "trainer": {
            "max_epochs": epochs,
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


def _recipe_args(recipe: str, fragment: Path) -> list[str]:
    return [f"--config={REPO / 'configs' / recipe}", f"--config={fragment}", *TINY_MODEL_ARGS]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(BIN), env.get("PATH", "")))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)  # 1 thread: as in this process (conftest)
    env.pop("DDPM_DEBUG", None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = SUBPROCESS_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])}... exited {proc.returncode}:\n{_tail(proc)}"
    return proc


def _tail(proc: subprocess.CompletedProcess, lines: int = 40) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(out: Path, world: int) -> list[dict]:
    files = sorted(out.glob("rank*.pt"))
    assert [f.name for f in files] == [f"rank{r}.pt" for r in range(world)], files
    return [torch.load(f, weights_only=True) for f in files]


def _assert_replicas_agree(ranks: list[dict]) -> None:
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


def _only_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "lightning_logs").glob("version_*"))
    assert len(runs) == 1, f"one run directory expected (written by rank 0 only), found {runs}"
    return runs[0]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


# -- presets, precision, accumulation --------------------------------------------------------------------------------
def _resolved(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_trainer_presets_compose_with_the_recipes(capsys):
    """configs/trainer/*.yaml are fragments: a second --config sets the trainer and leaves the recipe alone."""
    assert {p.stem for p in PRESETS} == {"single_gpu", "multi_gpu", "multi_node"}
    base = _resolved([f"--config={REPO / 'configs' / 'mnist.yaml'}"], capsys)
    for preset in PRESETS:
        resolved = _resolved([f"--config={REPO / 'configs' / 'mnist.yaml'}", f"--config={preset}"], capsys)
        want = yaml.safe_load(preset.read_text())["trainer"]
        assert {k: resolved["trainer"][k] for k in want} == want, preset.stem
        assert resolved["model"] == base["model"] and resolved["data"] == base["data"], preset.stem
        assert resolved["trainer"]["callbacks"] == base["trainer"]["callbacks"], preset.stem
    # and --trainer.precision / --trainer.strategy are accepted on top of every recipe
    for recipe in RECIPES:
        args = [f"--config={recipe}", "--trainer.precision=bf16-mixed", "--trainer.strategy=ddp"]
        trainer = _resolved(args, capsys)["trainer"]
        assert (trainer["precision"], trainer["strategy"]) == ("bf16-mixed", "ddp"), recipe.stem


@pytest.mark.parametrize("recipe", REAL_DATA_RECIPES, ids=[c.stem for c in REAL_DATA_RECIPES])
def test_bf16_mixed_with_accumulation_trains_each_real_data_recipe(recipe, shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fragment = _fragment(tmp_path / "run.yaml", shared_data)
    args = [*_recipe_args(recipe.name, fragment), "--trainer.precision=bf16-mixed"]
    cli = build_cli([*args, "--trainer.accumulate_grad_batches=2", "--trainer.fast_dev_run=4"], run=False)
    dtypes = set()
    cli.model.net.conv_in.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished and torch.bfloat16 in dtypes  # the U-Net really ran under bf16 autocast
    assert cli.trainer.global_step == 2  # 4 batches, 2 accumulated per optimizer step
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


class LossRecorder(Callback):
    """Keeps every training step's loss (in-process runs read it back from the trainer)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def _losses_of_run(tmp_path: Path, shared_data: Path, monkeypatch, name: str, *extra: str) -> tuple[torch.Tensor, Path]:
    run = tmp_path / name
    run.mkdir()
    monkeypatch.chdir(run)
    fragment = _fragment(run / "run.yaml", shared_data, steps_per_epoch=6)
    args = ["fit", *_recipe_args("mnist.yaml", fragment), "--data.batch_size=8", *extra]
    cli = build_cli(args)
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LossRecorder))
    return torch.stack(recorder.losses), run


def test_same_seed_same_losses_and_effective_batch_is_logged(shared_data, tmp_path, monkeypatch):
    """Determinism on CPU: the same config and seed give bitwise the same first losses; another seed does not."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = ["--trainer.callbacks+=test_scale.LossRecorder", "--trainer.accumulate_grad_batches=2"]
    first, run = _losses_of_run(tmp_path, shared_data, monkeypatch, "a", *record)
    second, _ = _losses_of_run(tmp_path, shared_data, monkeypatch, "b", *record)
    other, _ = _losses_of_run(tmp_path, shared_data, monkeypatch, "c", *record, "--seed_everything=7")
    assert len(first) == 6 and torch.equal(first, second), (first, second)
    assert not torch.equal(first, other)
    # batch 8 per device x 2 accumulated x 1 device, logged once, at the first step
    acc = EventAccumulator(str(_only_run_dir(run))).Reload()
    events = acc.Scalars("train/effective_batch_size")
    assert [(e.step, e.value) for e in events] == [(0, 16.0)]


# -- failure behaviour -----------------------------------------------------------------------------------------------
def _main_exit(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("ddpm: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_loss, calls = GaussianDiffusion.training_loss, []

    def diverging_loss(self, *args, **kwargs):
        calls.extend([1] if torch.is_grad_enabled() else [])  # training steps only, not validation
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss  # the 4th training step: global step 3

    monkeypatch.setattr(GaussianDiffusion, "training_loss", diverging_loss)
    fragment = _fragment(tmp_path / "run.yaml", shared_data, steps_per_epoch=6, ckpt_every=1)
    line = _main_exit(["fit", *_recipe_args("mnist.yaml", fragment)], capsys)
    assert line.startswith("ddpm: error: train/loss is nan at global step 3 (epoch 0, batch 3)"), line
    last = _only_run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert str(last.relative_to(tmp_path)) in line  # the message points at the checkpoint to resume from
    ckpt = _load(last)
    assert ckpt["global_step"] == 3  # written after the 3rd step; the NaN of the 4th never reached the weights
    for key in ("state_dict", "current_model_state"):
        assert all(torch.isfinite(v).all() for v in ckpt[key].values() if v.is_floating_point())


def _unreadable(kind: str, path: Path) -> None:
    torch.save({"state_dict": {"w": torch.randn(4096)}, "global_step": 1}, path)
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 8)


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "truncated last"])
def test_unreadable_checkpoint_is_a_one_line_error(kind, shared_data, tmp_path, monkeypatch, capsys):
    """Named by path (LightningCLI reads it first, for its hyperparameters) or found by ``--ckpt_path last``."""
    monkeypatch.chdir(tmp_path)
    if kind == "truncated last":  # a run killed while writing with a non-atomic save, say
        bad = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
        bad.parent.mkdir(parents=True)
        _unreadable("truncated", bad)
        ckpt_path = "last"
    else:
        bad = ckpt_path = tmp_path / f"{kind}.ckpt"
        _unreadable(kind, bad)
    fragment = _fragment(tmp_path / "run.yaml", shared_data)
    line = _main_exit(["fit", *_recipe_args("mnist.yaml", fragment), f"--ckpt_path={ckpt_path}"], capsys)
    assert line.startswith(f"ddpm: error: cannot read checkpoint '{bad}': the file is truncated or corrupt"), line


class _CreatesFile:
    """Unpickling this runs ``open(path, "w")``: what a malicious checkpoint would do with a worse callable."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_code_is_refused_and_never_run(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pwned = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "payload": _CreatesFile(pwned)}, evil)
    assert not pwned.exists()
    fragment = _fragment(tmp_path / "run.yaml", shared_data)
    line = _main_exit(["fit", *_recipe_args("mnist.yaml", fragment), f"--ckpt_path={evil}"], capsys)
    assert line.startswith(f"ddpm: error: refusing to load checkpoint '{evil}': it holds objects that could run"), line
    assert "open" in line  # the global it refused
    assert not pwned.exists()  # weights_only=True refused the global before calling it


# -- atomic checkpoints ----------------------------------------------------------------------------------------------
def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    """A crash half-way through writing leaves the previous last.ckpt whole, and no temporary file behind."""
    io_plugin, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, target)
    before = target.read_bytes()

    def crash_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip archive")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        io_plugin.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert io_plugin.load_checkpoint(target, weights_only=True)["global_step"] == 1


def _save_forever(target: str, saved) -> None:
    io_plugin, i = AtomicCheckpointIO(), 0
    while True:
        i += 1
        io_plugin.save_checkpoint({"i": i, "w": torch.full((2_000_000,), float(i))}, target)  # 8 MB
        saved.set()


@pytest.mark.slow
def test_sigkill_while_saving_never_leaves_a_torn_checkpoint(tmp_path):
    """SIGKILL a process that does nothing but write checkpoints, at a few arbitrary moments: last.ckpt loads."""
    import multiprocessing

    ctx, target = multiprocessing.get_context("fork"), tmp_path / "last.ckpt"  # fork: no second import of torch
    for delay in (0.01, 0.05, 0.13, 0.31):
        saved = ctx.Event()
        proc = ctx.Process(target=_save_forever, args=(str(target), saved), daemon=True)
        proc.start()
        assert saved.wait(timeout=60)  # one complete save, then kill somewhere in a later one
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        ckpt = _load(target)
        assert torch.equal(ckpt["w"], torch.full((2_000_000,), float(ckpt["i"])))
    AtomicCheckpointIO().save_checkpoint({"i": 0}, target)  # the next save clears what a kill left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -- preemption and exact resume -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_last_equals_the_uninterrupted_run(shared_data, tmp_path, monkeypatch):
    """2 epochs x 6 steps, a checkpoint every 3 steps; the run is SIGKILLed before step 4 (mid-epoch 0) and resumed
    with ``--ckpt_path last`` (from the newest earlier run). Everything matches the uninterrupted run bitwise:
    float ops on CPU are deterministic, and the resume restores data order, RNG, optimizer, schedulers and EMA."""
    fragment = _fragment(tmp_path / "run.yaml", shared_data, steps_per_epoch=6, epochs=2, ckpt_every=3)
    args = ["fit", *_recipe_args("mnist.yaml", fragment)]  # dropout 0.1, per-step warm-up, StepLR per epoch

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    monkeypatch.chdir(reference_dir)
    build_cli(args)
    reference = _load(_only_run_dir(reference_dir) / "checkpoints" / "last.ckpt")

    kill = "--trainer.callbacks+={class_path: test_scale.KillAt, init_args: {step: 4}}"
    proc = subprocess.run(
        [PY, "-m", "ddpm_lightning.cli", *args, kill], cwd=killed_dir, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, _tail(proc)
    interrupted = _load(_only_run_dir(killed_dir) / "checkpoints" / "last.ckpt")
    assert (interrupted["global_step"], interrupted["epoch"]) == (3, 0)  # mid-epoch

    monkeypatch.chdir(killed_dir)
    build_cli([*args, "--ckpt_path=last"])  # a new version_1 run, resuming from version_0's last.ckpt
    resumed = _load(killed_dir / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")

    assert (resumed["global_step"], resumed["epoch"]) == (reference["global_step"], reference["epoch"]) == (12, 1)
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


# -- DDP on one machine ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_cpu_processes(shared_data, tmp_path):
    """Lightning's own DDP launcher, 2 gloo processes, the conditional recipe, 2 accumulated batches per step."""
    out, prepare_log = tmp_path / "ranks", tmp_path / "prepare.log"
    probe = _callback("test_scale.RankProbe", out_dir=str(out))
    fragment = _fragment(
        tmp_path / "run.yaml", shared_data, extra_callbacks=(probe,), data_class="test_scale.CountingMNIST"
    )
    cmd = [PY, "-m", "ddpm_lightning.cli", "fit", *_recipe_args("mnist_conditional.yaml", fragment)]
    cmd += ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    cmd += ["--trainer.accumulate_grad_batches=2"]
    proc = _run(cmd, tmp_path, DDPM_TEST_PREPARE_LOG=str(prepare_log))
    ranks = _ranks(out, 2)
    assert [(r["global_rank"], r["world_size"], r["global_step"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    _assert_replicas_agree(ranks)
    assert ranks[0]["grid"] is not None and ranks[1]["grid"] is None  # the grid is drawn and written by rank 0
    assert len(prepare_log.read_text().split()) == 1  # data prepared (downloaded) by one process
    assert "effective batch size 64 = 16 per device x 2 accumulated x 2 devices" in proc.stdout + proc.stderr
    run = _only_run_dir(tmp_path)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]  # no second copy, no temporary file
    assert [p.name for p in (run / "samples").iterdir()] == ["epoch=000.png"]
    ckpt = _load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    for name, value in ranks[0]["ema"].items():  # the checkpoint's state_dict is the EMA every rank holds
        assert torch.equal(ckpt["state_dict"][name], value), name


@pytest.mark.slow
def test_torchrun_two_nodes_on_one_machine(shared_data, tmp_path):
    """``torchrun --nnodes 2 --nproc_per_node 1``, node ranks 0 and 1 launched apart (as on two machines)."""
    out = tmp_path / "ranks"
    probe = _callback("test_scale.RankProbe", out_dir=str(out))
    fragment = _fragment(tmp_path / "run.yaml", shared_data, extra_callbacks=(probe,))
    port = _free_port()
    launches = []
    for node_rank in (0, 1):
        cmd = [str(BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", "-m", "ddpm_lightning.cli", "fit"]
        cmd += [*_recipe_args("mnist.yaml", fragment), "--trainer.num_nodes=2", "--trainer.devices=1"]
        cmd += ["--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
        launches.append(
            subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = [p.communicate(timeout=SUBPROCESS_TIMEOUT)[0].decode() for p in launches]
    for p, text in zip(launches, outputs):
        assert p.returncode == 0, "\n".join(text.splitlines()[-40:])
    ranks = _ranks(out, 2)
    assert [(r["global_rank"], r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 0, 0), (1, 1, 0)]
    assert {r["environment"] for r in ranks} == {"TorchElasticEnvironment"}
    _assert_replicas_agree(ranks)
    run = _only_run_dir(tmp_path)
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == 4


# -- SLURM: a real two-node cluster on this machine ------------------------------------------------------------------
def _slurm_up() -> bool:
    probe = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.count("idle") + probe.stdout.count("mix") >= 2


@pytest.fixture(scope="module")
def slurm_cluster():
    """The two-node cluster of scripts/slurm_cluster.sh, started here when needed (and stopped again)."""
    in_ci = bool(os.environ.get("CI"))
    if shutil.which("sbatch") is None:
        msg = "SLURM is not installed: sudo scripts/slurm_cluster.sh install"
        pytest.fail(msg) if in_ci else pytest.skip(msg)
    started = False
    if not _slurm_up():
        if os.geteuid() != 0:
            msg = "the test cluster is down and starting it needs root: sudo scripts/slurm_cluster.sh start"
            pytest.fail(msg) if in_ci else pytest.skip(msg)
        subprocess.run([str(REPO / "scripts" / "slurm_cluster.sh"), "start"], check=True, timeout=180)
        started = True
    yield
    if started:
        subprocess.run([str(REPO / "scripts" / "slurm_cluster.sh"), "stop"], check=False, timeout=60)


def _job_field(job_id: str, field: str) -> str:
    """A field of ``scontrol show job`` ("" when absent)."""
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(token.split("=", 1) for token in text.split() if "=" in token).get(field, "")


def _wait(condition, timeout: float, what: str, job_id: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False)
            tail = "\n".join(log.read_text().splitlines()[-40:]) if log.exists() else "(no job output)"
            pytest.fail(
                f"SLURM job {job_id}: {what} within {timeout:.0f}s; job state {_job_field(job_id, 'JobState')}\n{tail}"
            )
        time.sleep(0.2)


@pytest.mark.slow
def test_slurm_two_nodes_preempted_requeued_and_resumed(slurm_cluster, shared_data, tmp_path):
    """The sbatch template on 2 nodes x 1 CPU task: SLURM's pre-timeout signal (sent early here, with scancel) makes
    Lightning write hpc_ckpt_1.ckpt and requeue the job; the requeued job resumes from it and finishes."""
    out, marker = tmp_path / "ranks", tmp_path / "paused"
    extra = (
        _callback("test_scale.RankProbe", out_dir=str(out)),
        _callback("test_scale.PauseForRequeue", step=2, marker=str(marker)),
    )
    fragment = _fragment(tmp_path / "run.yaml", shared_data, steps_per_epoch=4, extra_callbacks=extra)
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the template runs from the submit directory
    sbatch = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
    sbatch += ["--time=10", str(REPO / "scripts" / "slurm" / "ddpm.sbatch"), "configs/fashion_mnist.yaml"]
    sbatch += [f"--config={fragment}", *TINY_MODEL_ARGS, "--trainer.accelerator=cpu"]
    job_id = _run(sbatch, tmp_path, timeout=60, MASTER_PORT=str(_free_port())).stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-ddpm-{job_id}.out"

    _wait(marker.exists, 150, "no rank reached step 2", job_id, log)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # what --signal=SIGUSR1@90 sends
    # Lightning checkpoints and requeues; SLURM holds the job for cred_expire (10 s on the test cluster, 120 s by
    # default: slurmd refuses to relaunch a job id whose credential it revoked) and starts it again
    _wait(lambda: _job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 240, "no end", job_id, log)

    text = log.read_text()
    tail = text[-4000:]
    assert (_job_field(job_id, "JobState"), _job_field(job_id, "Restarts")) == ("COMPLETED", "1"), tail
    assert "--ckpt_path last: no checkpoint of an earlier run found" in text, tail  # the first start
    assert "Handling auto-requeue signal" in text and "Requeued SLURM job" in text, tail
    assert f"--ckpt_path last: resuming from {tmp_path / 'hpc_ckpt_1.ckpt'}" in text, tail  # the second start
    assert _load(tmp_path / "hpc_ckpt_1.ckpt")["global_step"] == 2
    ranks = _ranks(out, 2)  # written by the second start, which finished
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert {r["environment"] for r in ranks} == {"SLURMEnvironment"}
    _assert_replicas_agree(ranks)
    assert _load(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")["global_step"] == 4

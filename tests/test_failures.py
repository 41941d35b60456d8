"""Failure modes end in one line: a NaN loss names the step and the checkpoint to resume from; a truncated,
corrupt or code-carrying checkpoint is refused with its path, and nothing in it runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from scaleout import load_ckpt, only_run_dir, recipe_args, write_fragment

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.main import main


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
    fragment = write_fragment(tmp_path / "run.yaml", shared_data, steps_per_epoch=6, ckpt_every=1)
    line = _main_exit(["fit", *recipe_args("mnist.yaml", fragment)], capsys)
    assert line.startswith("ddpm: error: train/loss is nan at global step 3 (epoch 0, batch 3)"), line
    last = only_run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert str(last.relative_to(tmp_path)) in line  # the message points at the checkpoint to resume from
    ckpt = load_ckpt(last)
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
    fragment = write_fragment(tmp_path / "run.yaml", shared_data)
    line = _main_exit(["fit", *recipe_args("mnist.yaml", fragment), f"--ckpt_path={ckpt_path}"], capsys)
    assert line.startswith(f"ddpm: error: cannot read checkpoint '{bad}': the file is truncated or corrupt"), line


class _CreatesFile:
    """Unpickling this runs ``open(path, "w")``: what a malicious checkpoint would do with a worse callable."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize(
    ("writer", "command"),
    [("torch.save", "fit"), ("pickle.dump", "fit"), ("torch.save legacy", "sample"), ("pickle.dump", "export")],
)
def test_checkpoint_with_code_is_refused_and_never_run(writer, command, shared_data, tmp_path, monkeypatch, capsys):
    """Whatever wrote it (torch's zip, torch's legacy format, a plain pickle), a file whose unpickling would call a
    function is named for what it holds, never "truncated or corrupt", and nothing in it runs."""
    monkeypatch.chdir(tmp_path)
    pwned = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    payload = {"state_dict": {}, "global_step": 0, "payload": _CreatesFile(pwned)}
    with open(evil, "wb") as f:
        if writer == "pickle.dump":
            pickle.dump(payload, f)
        else:
            torch.save(payload, f, _use_new_zipfile_serialization=writer == "torch.save")
    assert not pwned.exists()
    if command == "fit":
        args = ["fit", *recipe_args("mnist.yaml", write_fragment(tmp_path / "run.yaml", shared_data))]
    else:
        args = [command, f"--out_dir={tmp_path / 'out'}"]
    line = _main_exit([*args, f"--ckpt_path={evil}"], capsys)
    expected = (
        f"ddpm: error: refusing to load checkpoint '{evil}': it holds objects other than tensors and plain values"
    )
    assert line.startswith(expected) and "weights_only=True on purpose, so nothing in it was run" in line, line
    assert "open" in line or "Unsupported operand" in line  # the global it refused, or the opcode
    assert not pwned.exists()  # weights_only=True refused the global before calling it
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_metrics_sampling_the_model_cannot_run_stops_before_training(
    subcommand, shared_data, tmp_path, monkeypatch, capsys
):
    """UniPC on uniform spacing takes at most T - 1 = 19 steps on T = 20: SampleMetrics' dry run at set-up refuses 20
    in one line, before any training step (fit, metrics every epoch) or test batch."""
    from ddpm_lightning.module import DiffusionModule

    monkeypatch.chdir(tmp_path)
    steps = []
    for name in ("training_step", "test_step"):
        real = getattr(DiffusionModule, name)
        monkeypatch.setattr(
            DiffusionModule, name, lambda self, *a, _real=real, **k: steps.append(1) or _real(self, *a, **k)
        )
    fragment = write_fragment(tmp_path / "run.yaml", shared_data)
    args = [subcommand, *recipe_args("mnist.yaml", fragment), "--model.num_timesteps=20", "--untrained=true"]
    args += ["--metrics.sampling.sampler=unipc", "--metrics.sampling.num_steps=20", "--metrics.every_n_epochs=1"]
    line = _main_exit(args, capsys)
    assert line == "ddpm: error: num_steps must be an integer in [1, 19] for spacing 'uniform', got 20", line
    assert steps == []  # not a training step nor a test batch ran

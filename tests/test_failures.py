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


# -- ddpm export's out_dir: refused where it would write over something, and never deletes ---------------------------
@pytest.fixture(scope="module")
def export_ckpt(tmp_path_factory) -> Path:
    """A small 8x8 checkpoint as Lightning writes it (as far as loading reads it)."""
    import lightning as L

    from ddpm_lightning.module import DiffusionModule

    module = DiffusionModule(
        in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4,
        num_timesteps=50,
    )  # fmt: skip
    ckpt = tmp_path_factory.mktemp("run") / "last.ckpt"
    payload = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3}
    torch.save({**payload, "pytorch-lightning_version": L.__version__, "epoch": 0}, ckpt)
    return ckpt


def _export(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["export", f"--ckpt_path={ckpt}", f"--out_dir={out}", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_to_an_existing_file_is_one_line_and_leaves_it(export_ckpt, tmp_path, capsys):
    target = tmp_path / "some_file.txt"
    target.write_text("keep me")
    line = _main_exit(_export(export_ckpt, target), capsys)
    assert line == f"ddpm: error: out_dir '{target}': '{target}' is an existing file, not a folder", line
    line = _main_exit(_export(export_ckpt, target / "sub", "--overwrite=true"), capsys)  # nor a folder under it
    assert line.endswith(f"'{target}' is an existing file, not a folder"), line
    assert target.read_text() == "keep me"


def test_export_into_a_non_empty_folder_needs_overwrite_and_touches_nothing_else(export_ckpt, tmp_path, capsys):
    from ddpm_lightning.hub import EXPORT_FILES

    out = tmp_path / "mine"
    (out / "unet").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "unet" / "old.bin").write_bytes(b"\x00" * 16)
    before = _snapshot(out)
    line = _main_exit(_export(export_ckpt, out), capsys)
    assert line.startswith(f"ddpm: error: out_dir '{out}' is not empty (2 entries, e.g. 'notes.txt')"), line
    assert "not an earlier export" in line and "--overwrite true" in line
    assert _snapshot(out) == before  # nothing written

    main(_export(export_ckpt, out, "--overwrite=true"))
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before  # what the export did not write is untouched, nothing deleted
    assert set(after) == set(before) | set(EXPORT_FILES)


def test_export_over_an_earlier_export_needs_overwrite(export_ckpt, tmp_path, capsys):
    out = tmp_path / "export"
    main(_export(export_ckpt, out))  # a new folder: no flag needed
    (out / "mine.txt").write_text("added by hand")
    readme = out / "README.md"
    readme.write_text("edited card")
    line = _main_exit(_export(export_ckpt, out), capsys)
    assert line.startswith(f"ddpm: error: out_dir '{out}' holds an earlier export; pass --overwrite true"), line
    assert readme.read_text() == "edited card"  # refused: nothing replaced

    main(_export(export_ckpt, out, "--overwrite=true"))
    assert readme.read_text() != "edited card"  # the card written anew
    assert (out / "mine.txt").read_text() == "added by hand"


@pytest.mark.parametrize("max_time", ["soon", "{weeks: 1, fortnights: 2}"])
def test_max_time_that_is_not_a_duration_is_one_line(max_time, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fragment = write_fragment(tmp_path / "run.yaml", shared_data)
    line = _main_exit(["fit", *recipe_args("mnist.yaml", fragment), f"--trainer.max_time={max_time}"], capsys)
    assert line.startswith("ddpm: error: --trainer.max_time ") and "is not a duration: give DD:HH:MM:SS" in line, line
    assert not (tmp_path / "lightning_logs").exists()  # refused before the trainer (and its logger) existed

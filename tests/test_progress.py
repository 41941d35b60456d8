"""The progress bar: plain lines when stdout is not a terminal (batch jobs), Lightning's rich bar on a terminal."""

from __future__ import annotations

import io
import re
import sys

import lightning as L
import pytest
import torch
import yaml
from conftest import ALL_CONFIGS, TINY_MODEL_ARGS
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks import EMA, ProgressBar
from ddpm_lightning.cli import build_cli
from ddpm_lightning.module import DiffusionModule

#: one plain line: epoch E/N step S/T loss L [val/loss V] R img/s ETA H:MM:SS (LIMIT)
LINE = re.compile(
    r"^epoch (?P<epoch>\d+)/(?P<epochs>\d+|\?) step (?P<step>\d+)/(?P<total>\d+|\?) loss (?P<loss>\d+\.\d{4})"
    r"(?: val/loss (?P<val>\d+\.\d{4}))? (?P<rate>\d+\.\d) img/s "
    r"ETA (?:(?P<eta>\d+:\d\d:\d\d) \((?P<limit>max_steps|max_epochs|max_time)\)|\?)$"
)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _loader(n: int, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=8)


def _fit(tmp_path, bar: ProgressBar, epochs: int = 2, callbacks_extra: tuple = (), **trainer_args) -> L.Trainer:
    """4 training batches of 8 images per epoch, one validation batch at each epoch's end, a sanity check first."""
    model = DiffusionModule(
        in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4,
        num_timesteps=50,
    )  # fmt: skip
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        callbacks=[EMA(decay=0.9), bar, *callbacks_extra],
        **trainer_args,
    )
    trainer.fit(model, _loader(32), _loader(8, seed=1))
    return trainer


def _lines(text: str) -> list[re.Match]:
    matches = [LINE.match(line) for line in text.splitlines() if line.startswith("epoch ")]
    assert all(matches), text
    return matches


def test_not_a_tty_prints_one_plain_line_per_step(tmp_path, capsys):
    bar = ProgressBar(every_n_steps=1)
    assert bar.plain and not bar.is_enabled  # pytest captures stdout: not a terminal, so no rich bar
    _fit(tmp_path, bar)
    out = capsys.readouterr().out
    lines = _lines(out)
    # one line per optimizer step, plus one right after each validation (its loss changed): steps 4 and 8
    assert [int(m["step"]) for m in lines] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8], out
    assert [int(m["epoch"]) for m in lines] == [1] * 5 + [2] * 5
    assert {(m["epochs"], m["total"]) for m in lines} == {("2", "8")}
    assert [m["val"] is not None for m in lines] == [False] * 4 + [True] * 6  # shown once there is one
    assert lines[4]["val"] != lines[-1]["val"]  # the second validation's line shows the new loss
    assert all(float(m["rate"]) > 0 and 0 < float(m["loss"]) < 10 for m in lines)
    assert lines[-1]["eta"] == "0:00:00"
    assert {m["limit"] for m in lines} == {"max_epochs"}  # 2 epochs x 4 batches end the run
    assert "━" not in out and "Epoch 0" not in out  # nothing of the rich bar (nor of the sanity check)


def test_eta_counts_the_limit_that_ends_the_run_first_and_names_it(tmp_path, capsys):
    """max_steps 6 comes before 2 epochs x 4 batches; a 5-hour max_time comes after both; without a step limit (an
    unbounded number of epochs, stopped here by the test at step 6) the ETA is max_time's: under 5 hours."""
    _fit(tmp_path, ProgressBar(every_n_steps=1), max_steps=6, max_time="00:05:00:00")
    lines = _lines(capsys.readouterr().out)
    assert [int(m["step"]) for m in lines] == [1, 2, 3, 4, 4, 5, 6]
    assert {(m["total"], m["limit"]) for m in lines} == {("6", "max_steps")}
    assert lines[-1]["eta"] == "0:00:00"

    class StopAt6(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = trainer.global_step >= 6

    _fit(tmp_path, ProgressBar(every_n_steps=1), epochs=-1, max_time="00:05:00:00", callbacks_extra=[StopAt6()])
    lines = _lines(capsys.readouterr().out)
    assert [m["limit"] for m in lines] == ["max_time"] * len(lines) and lines[-1]["step"] == "6"
    seconds = [sum(int(x) * f for x, f in zip(m["eta"].split(":"), (3600, 60, 1))) for m in lines]
    assert all(4 * 3600 < s <= 5 * 3600 for s in seconds), seconds  # 5 h minus the seconds this run took
    assert seconds == sorted(seconds, reverse=True)
    assert {(m["epochs"], m["total"]) for m in lines} == {("?", "?")}


def test_time_interval_prints_after_validation_and_at_the_end(tmp_path, capsys):
    bar = ProgressBar(every_n_seconds=1e6)  # no time-based line in this short run
    _fit(tmp_path, bar, epochs=1)
    lines = _lines(capsys.readouterr().out)
    assert [(int(m["step"]), m["val"] is not None) for m in lines] == [(4, True)]  # the validation's line only
    assert float(lines[0]["loss"]) > 0  # the mean over the 4 steps since the start


def test_a_terminal_gets_the_rich_bar(tmp_path, monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stdout", tty)
    bar = ProgressBar(every_n_steps=1)
    assert not bar.plain and bar.is_enabled
    assert ProgressBar(plain=True).plain  # forced either way
    _fit(tmp_path, bar, epochs=1)
    assert bar.progress is not None  # Lightning's rich Progress drew the bar
    assert not any(line.startswith("epoch ") for line in tty.getvalue().splitlines())
    monkeypatch.undo()
    assert not ProgressBar(plain=False).plain


def test_bad_intervals_are_refused():
    with pytest.raises(ValueError, match="every_n_steps"):
        ProgressBar(every_n_steps=0)
    with pytest.raises(ValueError, match="every_n_seconds"):
        ProgressBar(every_n_seconds=0)


def test_the_recipes_use_it_and_print_plain_lines(shared_data, tmp_path, monkeypatch, capsys):
    for config in ALL_CONFIGS:
        callbacks = [c["class_path"] for c in yaml.safe_load(config.read_text())["trainer"]["callbacks"]]
        assert "ddpm_lightning.callbacks.ProgressBar" in callbacks, config.name
        assert not any(c.endswith("RichProgressBar") for c in callbacks), config.name
    monkeypatch.chdir(tmp_path)
    args = ["fit", f"--config={ALL_CONFIGS[0].parent / 'mnist.yaml'}", f"--data.root={shared_data}"]
    args += ["--data.download=false", *TINY_MODEL_ARGS, "--trainer.fast_dev_run=2"]
    cli = build_cli(args)
    lines = _lines(capsys.readouterr().out)
    assert isinstance(cli.trainer.progress_bar_callback, ProgressBar)
    assert [int(m["step"]) for m in lines] == [2]  # the run's last line (30 s never passed)

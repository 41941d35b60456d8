"""Trainer presets compose with every recipe; bf16-mixed with gradient accumulation trains; the same seed gives
bitwise the same losses on CPU and the effective batch size is logged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from scaleout import PRESETS, REAL_DATA_RECIPES, RECIPES, LossRecorder, only_run_dir, recipe_args, write_fragment

from ddpm_lightning.cli import build_cli


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
    fragment = write_fragment(tmp_path / "run.yaml", shared_data)
    args = [*recipe_args(recipe.name, fragment), "--trainer.precision=bf16-mixed"]
    cli = build_cli([*args, "--trainer.accumulate_grad_batches=2", "--trainer.fast_dev_run=4"], run=False)
    dtypes = set()
    cli.model.net.conv_in.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished and torch.bfloat16 in dtypes  # the U-Net really ran under bf16 autocast
    assert cli.trainer.global_step == 2  # 4 batches, 2 accumulated per optimizer step
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def _losses_of_run(tmp_path: Path, shared_data: Path, monkeypatch, name: str, *extra: str) -> tuple[torch.Tensor, Path]:
    run = tmp_path / name
    run.mkdir()
    monkeypatch.chdir(run)
    fragment = write_fragment(run / "run.yaml", shared_data, steps_per_epoch=6)
    args = ["fit", *recipe_args("mnist.yaml", fragment), "--data.batch_size=8", *extra]
    cli = build_cli(args)
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LossRecorder))
    return torch.stack(recorder.losses), run


def test_same_seed_same_losses_and_effective_batch_is_logged(shared_data, tmp_path, monkeypatch):
    """Determinism on CPU: the same config and seed give bitwise the same first losses; another seed does not."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = ["--trainer.callbacks+=scaleout.LossRecorder", "--trainer.accumulate_grad_batches=2"]
    first, run = _losses_of_run(tmp_path, shared_data, monkeypatch, "a", *record)
    second, _ = _losses_of_run(tmp_path, shared_data, monkeypatch, "b", *record)
    other, _ = _losses_of_run(tmp_path, shared_data, monkeypatch, "c", *record, "--seed_everything=7")
    assert len(first) == 6 and torch.equal(first, second), (first, second)
    assert not torch.equal(first, other)
    # batch 8 per device x 2 accumulated x 1 device, logged once, at the first step
    acc = EventAccumulator(str(only_run_dir(run))).Reload()
    events = acc.Scalars("train/effective_batch_size")
    assert [(e.step, e.value) for e in events] == [(0, 16.0)]

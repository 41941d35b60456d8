"""The `ddpm` CLI: every config runs, the main job writes what TensorBoard shows, bad input gets one line."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, TINY_MODEL_ARGS

from ddpm_lightning.cli import build_cli
from ddpm_lightning.main import main


def _data_args(root) -> list[str]:
    return [f"--data.root={root}", "--data.download=false"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_fast_dev_run(config, shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", f"--config={config}", *_data_args(shared_data), *TINY_MODEL_ARGS, "--trainer.fast_dev_run=1"]
    )
    assert cli.trainer.state.finished
    hp = cli.model.hparams
    # sizes linked from the DataModule, not typed in the YAML
    assert (hp.in_channels, hp.image_size, hp.num_classes) == (1, 28, 10)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_configs_exist():
    assert {c.stem for c in CONFIGS} >= {"mnist", "mnist_conditional", "fashion_mnist"}


@pytest.mark.slow
def test_main_job_writes_logs_and_ema_checkpoint(shared_data, tmp_path, monkeypatch):
    """The README's main job, shortened: TensorBoard events hold losses, lr and images; the ckpt holds EMA weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config=configs/mnist.yaml", *_data_args(shared_data), *TINY_MODEL_ARGS]
    args[1] = f"--config={CONFIGS[0].parent / 'mnist.yaml'}"
    args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=2"]
    args += ["--trainer.log_every_n_steps=2", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelSummary"]
    build_cli(args)
    version = tmp_path / "lightning_logs" / "version_0"
    acc = EventAccumulator(str(version), size_guidance={"images": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss_step", "val/loss", "train/lr"} <= scalars, scalars
    assert {"samples/grid", "samples/trajectory"} <= set(acc.Tags()["images"])
    assert list((version / "samples").glob("epoch=000.png"))
    ckpt = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    key = "net.conv_in.weight" if "net.conv_in.weight" in ema else next(k for k in ema if k.endswith("weight"))
    assert not torch.equal(ema[key], raw[key])  # EMA differs from the raw weights after training


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        # Literal choices are checked by the parser, before anything runs, and the message lists them
        (
            "--model.schedule=quadratic",
            'ddpm: error: Parser key "model.schedule": Expected a typing.Literal'
            "['linear', 'cosine', 'sigmoid', 'polynomial']. Got value: quadratic",
        ),
        ("--model.prediction_type=score", "Literal['eps', 'x0', 'v']. Got value: score"),
        # values checked by the classes themselves end in one `ddpm: error:` line
        ("--model.num_timesteps=1", "ddpm: error: num_timesteps must be >= 2, got 1"),
        ("--data.image_size=30", "ddpm: error: image_size 30 cannot be halved 2 times"),
        ("--model.schedule_params={tau: 0}", "ddpm: error: "),
    ],
)
def test_bad_values_are_clear_errors(override, needle, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = CONFIGS[0].parent / "mnist.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}", *_data_args(shared_data), override, "--trainer.fast_dev_run=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "lightning_logs").exists()  # nothing was started


def test_missing_dataset_and_unknown_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = CONFIGS[0].parent / "mnist.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}", *_data_args(tmp_path / "nowhere"), "--trainer.fast_dev_run=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "ddpm: error: MNIST not found" in err and "Traceback" not in err
    # a misspelt key, on the command line (no prefix abbreviation accepted) or in a YAML file
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}", "--model.num_timestep=10", "--print_config"])
    assert exit_info.value.code == 2
    assert "ddpm: error: unrecognized arguments: --model.num_timestep=10" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("num_timesteps: 1000", "num_timestep: 1000"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={bad}", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error:") and "does not accept option" in err and "num_timestep'" in err


def test_every_config_is_exercised():
    from conftest import ALL_CONFIGS, CLASSIFIER_CONFIGS, FINETUNE_CONFIGS, HF_CONFIGS, STANDIN_CONFIGS

    exercised = {c.stem for c in CONFIGS} | STANDIN_CONFIGS | CLASSIFIER_CONFIGS | FINETUNE_CONFIGS | HF_CONFIGS
    assert {c.stem for c in ALL_CONFIGS} == exercised
    assert HF_CONFIGS == {"hf_dataset"}  # run by tests/test_hf_data.py
    assert FINETUNE_CONFIGS == {"finetune_ddpm_cifar10"}  # run by tests/test_hub.py
    assert CLASSIFIER_CONFIGS == {"classifier_mnist", "classifier_fashion_mnist"}

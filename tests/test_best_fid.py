"""Sample metrics during `ddpm fit` (metrics.every_n_epochs): the FID and its wall time are logged, and the
lowest-FID checkpoint is kept as best-fid-*.ckpt."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO, TINY_MODEL_ARGS

from ddpm_lightning.callbacks.metrics import SampleMetrics
from ddpm_lightning.cli import build_cli

CONFIG = REPO / "configs" / "mnist_conditional.yaml"


def _scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.slow
def test_fit_with_every_n_epochs_keeps_the_best_fid_checkpoint(shared_data, tmp_path):
    args = ["fit", f"--config={CONFIG}", f"--data.root={shared_data}", "--data.download=false", *TINY_MODEL_ARGS]
    args += ["--model.num_timesteps=50", f"--trainer.default_root_dir={tmp_path}"]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_epochs=3"]
    args += ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--model.warmup_steps=0"]
    args += ["--metrics.every_n_epochs=1", "--metrics.num_samples=20", "--metrics.reference_num=100"]
    args += ["--metrics.sampling.sampler=ddim", "--metrics.sampling.num_steps=3", "--metrics.batch_size=10"]
    args += [f"--metrics.cache_dir={tmp_path / 'cache'}"]
    cli = build_cli(args)
    version = tmp_path / "lightning_logs" / "version_0"
    fids = _scalars(version, "metrics/fid_classifier")
    seconds = _scalars(version, "metrics/seconds")
    assert len(fids) == 3 and len(seconds) == 3 and all(s > 0 for _, s in seconds)  # one evaluation per epoch, timed
    best = sorted((version / "checkpoints").glob("best-fid-*.ckpt"))
    assert len(best) == 1, best  # save_top_k=1: the earlier, worse ones are gone
    epoch, fid = re.fullmatch(r"best-fid-epoch=(\d+)-fid_classifier=([\d.]+)\.ckpt", best[0].name).groups()
    lowest = min(range(3), key=lambda i: fids[i][1])
    assert int(epoch) == lowest and float(fid) == pytest.approx(fids[lowest][1], abs=0.006)
    (metrics,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SampleMetrics)]
    assert metrics.best_checkpoint.best_model_path == str(best[0])
    assert float(metrics.best_checkpoint.best_model_score) == pytest.approx(fids[lowest][1], rel=1e-6)
    state = torch.load(best[0], map_location="cpu", weights_only=True)
    assert state["epoch"] == lowest and any("metrics/fid_classifier" in key for key in state["callbacks"])
    assert (version / "checkpoints" / "last.ckpt").is_file()  # the recipe's own checkpoints are still written


def test_no_best_fid_checkpoint_without_every_n_epochs_or_when_off():
    class Trainer:
        callbacks: list = []

    for metrics in (SampleMetrics(), SampleMetrics(every_n_epochs=2, keep_best=False)):
        metrics.add_best_checkpoint(Trainer())
        assert metrics.best_checkpoint is None and Trainer.callbacks == []
    metrics = SampleMetrics(every_n_epochs=2, extractors=["inception"])
    metrics.add_best_checkpoint(Trainer())
    metrics.add_best_checkpoint(Trainer())  # once only
    assert Trainer.callbacks == [metrics.best_checkpoint]
    assert (metrics.best_checkpoint.monitor, metrics.best_checkpoint.every_n_epochs) == ("metrics/fid_inception", 2)

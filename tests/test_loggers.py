"""Loggers chosen in YAML: `--config configs/loggers/{csv,wandb}.yaml` after a recipe, no code changes.

A short real fit (fast_dev_run would turn the loggers off) on the MNIST files in ../shared/data; the metrics and the
sample grids must reach the chosen logger. W&B runs offline with its folders in tmp_path and never touches the
network.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import struct
from pathlib import Path

import pytest
from conftest import REPO, TINY_MODEL_ARGS
from PIL import Image

from ddpm_lightning.callbacks import SampleGrid
from ddpm_lightning.cli import build_cli

MNIST = REPO / "configs" / "mnist.yaml"
LOGGERS = REPO / "configs" / "loggers"


def _short_fit(shared_data: Path, logger_config: Path) -> None:
    """One epoch of 2 train batches and 1 val batch with a tiny U-Net, grids of 4 images in 5 DDIM steps."""
    args = [f"--config={MNIST}", f"--config={logger_config}", f"--data.root={shared_data}", "--data.download=false"]
    args += [*TINY_MODEL_ARGS, "--data.batch_size=16", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    args += ["--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_model_summary=false"]
    cli = build_cli(args, run=False)
    for cb in cli.trainer.callbacks:
        if isinstance(cb, SampleGrid):  # the recipe's 64 images x 50 steps would dominate the test's time
            cb.num_samples, cb.num_steps, cb.trajectory_images = 4, 5, 2
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished


@pytest.mark.slow
def test_csv_logger_from_yaml_writes_metrics_and_png_grids(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _short_fit(shared_data, LOGGERS / "csv.yaml")
    version = tmp_path / "lightning_logs" / "version_0"
    with open(version / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("train/loss_step", "train/loss_epoch", "val/loss"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(math.isfinite(v) for v in values), (key, rows)
    # CSV holds no images: the grids are the PNGs in the same run folder
    assert Image.open(version / "samples" / "epoch=000.png").size[0] > 28
    assert (version / "samples" / "trajectory_epoch=000.png").is_file()
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "wandb").exists()


# -- W&B offline ------------------------------------------------------------------------------------------------------
def _wandb_records(path: Path) -> list[bytes]:
    """Records of a `run-<id>.wandb` file: LevelDB's log format (32 KiB blocks, records split into FULL or
    FIRST/MIDDLE.../LAST chunks, each with a 7-byte header: crc32 (4), length (2), type (1)) after a 7-byte file header
    (":W&B", magic 0xBEE1, version 0)."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    block, header, full, last = 32768, 7, 1, 4
    records, pending, pos = [], b"", header
    while pos + header <= len(raw):
        left = block - pos % block
        if left < header:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + header])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        pending += raw[pos + header : pos + header + length]
        pos += header + length
        if kind in (full, last):
            records.append(pending)
            pending = b""
    return records


def _wandb_history(run_dir: Path) -> list[dict]:
    """The rows passed to `wandb.log` in an offline run, read back from its `.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows, kinds = [], set()
    for data in _wandb_records(next(run_dir.glob("run-*.wandb"))):
        record = pb.Record()
        record.ParseFromString(data)
        kinds.add(record.WhichOneof("record_type"))
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    assert "exit" in kinds, f"run file not closed: {sorted(kinds)}"
    return rows


@pytest.mark.slow
@pytest.mark.usefixtures("no_network")
def test_wandb_offline_logger_from_yaml_keeps_losses_and_images(shared_data, tmp_path, monkeypatch):
    if not os.environ.get("CI"):
        pytest.importorskip("wandb", reason="the W&B logger needs the wandb extra: pip install -e '.[wandb]'")
    monkeypatch.chdir(tmp_path)
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": tmp_path,
        "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
        "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
        "WANDB_DATA_DIR": tmp_path / "wandb-data",
        "WANDB_SILENT": "true",
    }.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    try:
        _short_fit(shared_data, LOGGERS / "wandb.yaml")
    finally:
        import wandb

        wandb.finish()  # a failed fit must not leave the run open for the next test
        wandb.teardown()  # waits for wandb's service to close the run's files (finish() alone may return earlier)

    (run,) = [Path(p) for p in glob.glob(str(tmp_path / "wandb" / "offline-run-*"))]
    history = _wandb_history(run)
    logged = {key: row[key] for row in history for key in row}
    for key in ("train/loss_step", "train/loss_epoch", "val/loss"):
        assert key in logged and math.isfinite(logged[key]), (key, history)
    for tag in ("samples/grid", "samples/trajectory"):
        (filename,) = logged[f"{tag}/filenames"]
        image = Image.open(run / "files" / filename)
        assert image.size == (logged[f"{tag}/width"], logged[f"{tag}/height"])
    # PNGs and checkpoints sit beside each other in <save_dir>/<project>/<run id>, not in the working folder's root
    run_id = run.name.rsplit("-", 1)[-1]
    assert (tmp_path / "ddpm-lightning" / run_id / "samples" / "epoch=000.png").is_file()
    assert (tmp_path / "ddpm-lightning" / run_id / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "samples").exists()

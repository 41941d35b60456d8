"""Checkpoints are written atomically: a failed or killed save leaves the previous ``last.ckpt`` whole."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from scaleout import load_ckpt

from ddpm_lightning.checkpointing import AtomicCheckpointIO


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
        ckpt = load_ckpt(target)
        assert torch.equal(ckpt["w"], torch.full((2_000_000,), float(ckpt["i"])))
    AtomicCheckpointIO().save_checkpoint({"i": 0}, target)  # the next save clears what a kill left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_concurrent_writers_of_one_target_all_succeed(tmp_path):
    """The ranks of a DDP job cache the same reference statistics at once: each writes through its own temporary file
    (a shared ``.tmp`` name made one rank's rename fail and the job hang up on the other)."""
    import threading

    from ddpm_lightning.checkpointing import atomic_save

    target, errors = tmp_path / "stats.pt", []

    def write(rank: int) -> None:
        try:
            for i in range(30):
                atomic_save({"rank": rank, "i": i, "w": torch.full((20_000,), float(rank))}, target)
        except BaseException as err:  # noqa: BLE001 - every failure of a writer is the finding
            errors.append(err)

    threads = [threading.Thread(target=write, args=(rank,)) for rank in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    blob = torch.load(target, weights_only=True)
    assert blob["i"] == 29 and torch.equal(blob["w"], torch.full((20_000,), float(blob["rank"])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.pt"]  # no temporary file left behind

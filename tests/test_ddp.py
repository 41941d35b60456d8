"""DDP on one machine: Lightning's own launcher, two gloo processes on CPU; one model, sharded data, rank-zero
writers."""

from __future__ import annotations

import pytest
import torch
from scaleout import (
    PY,
    assert_replicas_agree,
    callback,
    load_ckpt,
    load_ranks,
    only_run_dir,
    recipe_args,
    run_ok,
    write_fragment,
)

from ddpm_lightning.callbacks.phema import snapshot_name
from ddpm_lightning.phema import power_beta


@pytest.mark.slow
def test_ddp_two_cpu_processes(shared_data, tmp_path):
    """Lightning's own DDP launcher, 2 gloo processes, the conditional recipe, 2 accumulated batches per step."""
    out, prepare_log, phema_dir = tmp_path / "ranks", tmp_path / "prepare.log", tmp_path / "phema"
    probe = callback("scaleout.RankProbe", out_dir=str(out))
    fragment = write_fragment(
        tmp_path / "run.yaml", shared_data, extra_callbacks=(probe,), data_class="scaleout.CountingMNIST"
    )
    cmd = [PY, "-m", "ddpm_lightning.cli", "fit", *recipe_args("mnist_conditional.yaml", fragment)]
    # appended after the fragment's list, as the experiments runner adds it (a later list of the recipe's length
    # would be merged into the recipe's item by item by jsonargparse, not put in its place)
    cmd += ["--trainer.callbacks+=ddpm_lightning.callbacks.PostHocEMA", "--trainer.callbacks.every_n_steps=1"]
    cmd += [f"--trainer.callbacks.dirpath={phema_dir}"]
    cmd += ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    cmd += ["--trainer.accumulate_grad_batches=2"]
    proc = run_ok(cmd, tmp_path, DDPM_TEST_PREPARE_LOG=str(prepare_log))
    ranks = load_ranks(out, 2)
    assert [(r["global_rank"], r["world_size"], r["global_step"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    assert_replicas_agree(ranks)
    assert ranks[0]["grid"] is not None and ranks[1]["grid"] is None  # the grid is drawn and written by rank 0
    assert len(prepare_log.read_text().split()) == 1  # data prepared (downloaded) by one process
    assert "effective batch size 64 = 16 per device x 2 accumulated x 2 devices" in proc.stdout + proc.stderr
    run = only_run_dir(tmp_path)
    # the fragment's ModelCheckpoint (every 2 steps, top 1, no monitor) and its last.ckpt: no temporary file beside
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert load_ckpt(run / "checkpoints" / "epoch=0-step=2.ckpt")["global_step"] == 2
    assert [p.name for p in (run / "samples").iterdir()] == ["epoch=000.png"]
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    for name, value in ranks[0]["ema"].items():  # the checkpoint's state_dict is the EMA every rank holds
        assert torch.equal(ckpt["state_dict"][name], value), name

    # post-hoc EMA beside the classic one: one snapshot per step, written whole (by rank 0), no temporary file
    assert sorted(p.name for p in phema_dir.iterdir()) == [snapshot_name(1), snapshot_name(2)]
    first, second = (torch.load(phema_dir / snapshot_name(k), weights_only=True) for k in (1, 2))
    assert (first["step"], second["step"]) == (1, 2)
    theta2 = ranks[0]["params"]  # the raw weights after step 2, the same on both ranks (assert_replicas_agree)
    for gamma, state1, state2 in zip(second["gammas"], first["states"], second["states"]):
        beta = power_beta(gamma, 2)  # step 1 has beta 0: the snapshot of step 1 is theta_1 for every sigma_rel
        for name, value in state2.items():
            assert torch.allclose(value, beta * state1[name] + (1 - beta) * theta2[name], atol=1e-6), name

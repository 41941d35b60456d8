"""Multi-node launchers on one machine: torchrun with two node ranks, and the sbatch template on a real two-node
SLURM cluster (scripts/slurm_cluster.sh), preempted, requeued and resumed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_MODEL_ARGS
from scaleout import (
    BIN,
    SUBPROCESS_TIMEOUT,
    assert_replicas_agree,
    callback,
    free_port,
    load_ckpt,
    load_ranks,
    only_run_dir,
    recipe_args,
    run_ok,
    subprocess_env,
    write_fragment,
)

#: a plain progress line of ddpm_lightning.callbacks.ProgressBar (its format: tests/test_progress.py)
PROGRESS_LINE = re.compile(
    r"^epoch \d+/\d+ step \d+/\d+ loss \d+\.\d{4}( val/loss \d+\.\d{4})? \d+\.\d img/s ETA \S+( \(\w+\))?$"
)


@pytest.mark.slow
def test_torchrun_two_nodes_on_one_machine(shared_data, tmp_path):
    """``torchrun --nnodes 2 --nproc_per_node 1``, node ranks 0 and 1 launched apart (as on two machines)."""
    out = tmp_path / "ranks"
    probe = callback("scaleout.RankProbe", out_dir=str(out))
    fragment = write_fragment(tmp_path / "run.yaml", shared_data, extra_callbacks=(probe,))
    port = free_port()
    launches = []
    for node_rank in (0, 1):
        cmd = [str(BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", "-m", "ddpm_lightning.cli", "fit"]
        cmd += [*recipe_args("mnist.yaml", fragment), "--trainer.num_nodes=2", "--trainer.devices=1"]
        cmd += ["--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
        launches.append(
            subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = [p.communicate(timeout=SUBPROCESS_TIMEOUT)[0].decode() for p in launches]
    for p, text in zip(launches, outputs):
        assert p.returncode == 0, "\n".join(text.splitlines()[-40:])
    ranks = load_ranks(out, 2)
    assert [(r["global_rank"], r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 0, 0), (1, 1, 0)]
    assert {r["environment"] for r in ranks} == {"TorchElasticEnvironment"}
    assert_replicas_agree(ranks)
    run = only_run_dir(tmp_path)
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4


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
        callback("scaleout.RankProbe", out_dir=str(out)),
        callback("scaleout.PauseForRequeue", step=2, marker=str(marker)),
        callback("ddpm_lightning.callbacks.ProgressBar", every_n_steps=1),  # the job's stdout is a file: plain lines
    )
    fragment = write_fragment(
        tmp_path / "run.yaml", shared_data, steps_per_epoch=4, extra_callbacks=extra, enable_progress_bar=True
    )
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the template runs from the submit directory
    sbatch = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
    sbatch += ["--time=10", str(REPO / "scripts" / "slurm" / "ddpm.sbatch"), "configs/fashion_mnist.yaml"]
    sbatch += [f"--config={fragment}", *TINY_MODEL_ARGS, "--trainer.accelerator=cpu"]
    job_id = run_ok(sbatch, tmp_path, timeout=60, MASTER_PORT=str(free_port())).stdout.strip().split(";")[0]
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
    assert load_ckpt(tmp_path / "hpc_ckpt_1.ckpt")["global_step"] == 2
    ranks = load_ranks(out, 2)  # written by the second start, which finished
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert {r["environment"] for r in ranks} == {"SLURMEnvironment"}
    assert_replicas_agree(ranks)
    assert load_ckpt(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")["global_step"] == 4
    # the progress bar's plain lines, from rank zero only: step 3 is run once, by the second start, and validated never
    progress = [line for line in text.splitlines() if PROGRESS_LINE.match(line)]
    assert any(line.startswith("epoch 1/1 step 4/4 loss ") for line in progress), tail
    assert sum(" step 3/4 " in line for line in progress) == 1, progress

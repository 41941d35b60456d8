"""scripts/gpu_check.sh cannot rot: its dry run prints commands that the CLI and the benchmark accept, within the
8-minute budget, and its CPU fallback runs every stage end to end and writes the summary."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from ddpm_lightning.cli import build_cli

SCRIPT = REPO / "scripts" / "gpu_check.sh"
STAGE = re.compile(r"^gpu_check: \[(?P<name>[\w-]+)\] \(timeout (?P<limit>\d+)s, in (?P<dir>\S+)\) (?P<cmd>.+)$")


def _gpu_check(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_valid_commands_within_the_budget(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    proc = _gpu_check("--dry-run", "--data-root", str(shared_data), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    stages = {m["name"]: m for m in map(STAGE.match, proc.stdout.splitlines()) if m}
    assert list(stages) == ["install", "fit", "fit-ddp", "bench"], proc.stdout
    assert sum(int(m["limit"]) for m in stages.values()) <= 8 * 60  # every stage at its timeout: still 8 minutes
    assert not out.exists()  # a dry run writes nothing

    assert "scripts/install_keep_torch.sh bench" in stages["install"]["cmd"]
    fit, ddp = (shlex.split(stages[name]["cmd"]) for name in ("fit", "fit-ddp"))
    assert fit[:3] == [sys.executable, "-m", "ddpm_lightning.cli"]
    for cmd in (fit, ddp):
        text = " ".join(cmd)
        assert "--trainer.precision bf16-mixed --trainer.max_steps 300" in text
        assert f"--data.root {shared_data.resolve()}" in text and str(REPO / "configs" / "mnist.yaml") in text
    assert " ".join(ddp).endswith("--trainer.strategy ddp --trainer.devices -1")
    for cmd in (fit, ddp):  # the CLI accepts every option (the progress-bar override finds its callback)
        with pytest.raises(SystemExit) as exit_info:
            build_cli([*cmd[3:], "--print_config"])
        assert exit_info.value.code in (0, None)
        assert "every_n_steps: 50" in capsys.readouterr().out

    sys.path.insert(0, str(REPO))  # benchmarks/ is a top-level folder
    from benchmarks import bench

    bench_cmd = shlex.split(stages["bench"]["cmd"])
    assert bench_cmd[:3] == [sys.executable, "-m", "benchmarks.bench"]
    args = bench.parse_args(bench_cmd[3:])  # the benchmark still has every flag the script passes
    assert (args.device, args.precision, args.shapes) == ("cuda", "bf16", ["cifar10"])


def test_bad_arguments_are_refused(shared_data, tmp_path):
    for args, needle in [
        (["--data-root", str(tmp_path)], "no MNIST under --data-root"),
        (["--data-root", str(shared_data), "--steps", "0"], "--steps must be a positive integer"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
    ]:
        proc = _gpu_check("--dry-run", *args)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)


@pytest.mark.slow
def test_cpu_fallback_runs_every_stage_and_writes_the_summary(shared_data, tmp_path):
    """About a minute on 2 CPU cores: a 3-step fit, a 2-process DDP fit and the benchmark's tiny shape."""
    out = tmp_path / "out"
    proc = _gpu_check("--cpu", "--skip-install", "--data-root", str(shared_data), "--out", str(out), timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("fit", "fit-ddp", "bench"):
        assert f"[{stage}] ok after" in proc.stdout
    assert sorted(p.name for p in out.glob("*.log")) == ["bench.log", "fit-ddp.log", "fit.log"]
    summary = (out / "summary.md").read_text()
    assert "- stages: bench ok, fit ok, fit-ddp ok" in summary
    rows = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    assert re.search(r"\| fit, bf16-mixed, 1 device\(s\), step 3/3 \| \d+\.\d \| n/a \|", summary), summary
    assert re.search(r"\| fit, bf16-mixed, DDP, 2 device\(s\), step 3/3 \| \d+\.\d \| n/a \|", summary), summary
    assert re.search(r"\| bench train, tiny shape \| [\d.]+ \| \d+ MiB above the step's start \| \d+% \|", summary)
    assert "bench sample, tiny shape" in rows
    from ddpm_lightning.precision import cpu_bf16_flags

    expected = "bf16" if cpu_bf16_flags() else "fp32"  # the CPU fallback benches bf16 only where the CPU computes it
    assert f"- bench precision: {expected}; limit (100%):" in summary

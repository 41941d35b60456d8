"""The summary of scripts/gpu_check.sh: one markdown file from the stages' logs and the benchmark's report.

    python scripts/gpu_check_summary.py --out gpu_check --mode gpu --steps 300 --status fit=ok ...

Reads ``fit.log`` and ``fit-ddp.log`` (the last plain line of ddpm_lightning.callbacks.ProgressBar: img/s over all
ranks and rank zero's peak CUDA memory; the number of devices from the "effective batch size" line) and
``bench.md`` (the Results and ratio tables of ``python -m benchmarks.bench``, read by their column names: the
benchmark writes no machine-readable file). Writes ``summary.md`` with one row per stage.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

#: the figures of one plain progress line
PROGRESS = re.compile(r"^epoch \S+ step (?P<step>\d+)/\S+ .*?(?P<rate>[\d.]+) img/s(?: mem (?P<mem>[\d.]+) GiB)? ETA")
DEVICES = re.compile(r"effective batch size \d+ = \d+ per device x \d+ accumulated x (?P<devices>\d+) devices")


def fit_row(log: Path) -> dict[str, str]:
    """img/s and peak memory of a fit from its last progress line ({} when the log has none)."""
    if not log.exists():
        return {}
    text = log.read_text(errors="replace")
    lines = [m for m in map(PROGRESS.match, text.splitlines()) if m]
    devices = DEVICES.search(text)
    row = {"devices": devices["devices"] if devices else "?"}
    if lines:
        last = lines[-1]
        row |= {"step": last["step"], "img/s": last["rate"], "mem": f"{last['mem']} GiB" if last["mem"] else "n/a"}
    return row


def markdown_table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first table under ``## heading``, as {column name: cell}."""
    section = text.split(f"## {heading}\n", 1)
    if len(section) < 2:
        return []
    rows = [line for line in section[1].splitlines() if line.startswith("|")]
    if len(rows) < 2:
        return []
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def bench_rows(report: Path) -> tuple[list[list[str]], str]:
    """Rows (train and sample per shape, ours) and the report's limit line; ([], "") without a report."""
    if not report.exists():
        return [], ""
    text = report.read_text()
    limit = next((line[2:] for line in text.splitlines() if line.startswith("- precision:")), "")
    ratios = {
        (r["shape"], r["ours vs"]): r for r in markdown_table(text, "Ours relative to each peer") if "ours vs" in r
    }
    rows = []
    for r in markdown_table(text, "Results"):
        if r.get("implementation") != "ours":
            continue
        peer = ratios.get((r["shape"], "diffusers"), {})
        for kind in ("train", "sample"):
            rows.append(
                [
                    f"bench {kind}, {r['shape']} shape",
                    r.get(f"{kind} img/s", "?"),
                    f"{r.get(f'{kind} mem MiB', '?')} MiB above the step's start",
                    r.get(f"{kind} % of limit", "?"),
                    peer.get(f"{kind} img/s", "n/a (no diffusers row)"),
                ]
            )
    return rows, limit


def device_name(mode: str) -> str:
    if mode == "cpu":
        return "CPU (fallback run: figures say nothing about a GPU)"
    try:
        import torch

        count = torch.cuda.device_count()
        return f"{count} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    except Exception as err:  # the summary must still be written
        return f"unknown ({type(err).__name__}: {err})"


def render(out: Path, mode: str, steps: int, status: dict[str, str]) -> str:
    lines = [
        "# GPU check",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- device: {device_name(mode)}",
        "- stages: " + ", ".join(f"{name} {state}" for name, state in sorted(status.items())),
    ]
    table = [
        "| stage | img/s | peak memory | % of bf16 peak | ours / diffusers |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, what in (("fit", "fit, bf16-mixed"), ("fit-ddp", "fit, bf16-mixed, DDP")):
        row = fit_row(out / f"{name}.log")
        label = f"{what}, {row.get('devices', '?')} device(s), step {row.get('step', '?')}/{steps}"
        table.append(f"| {label} | {row.get('img/s', 'n/a')} | {row.get('mem', 'n/a')} | n/a | n/a |")
    rows, limit = bench_rows(out / "bench.md")
    table += [f"| {' | '.join(row)} |" for row in rows] or ["| bench | n/a | n/a | n/a | n/a |"]
    if limit:
        lines.append(f"- bench {limit}")
    lines += [
        "- fit img/s: all ranks, over the last progress interval; peak memory: rank zero's torch.cuda."
        "max_memory_allocated (n/a on CPU)",
        "",
        *table,
        "",
        f"Logs: {', '.join(sorted(p.name for p in out.glob('*.log')))}; the benchmark's full report: bench.md.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the folder of the logs; summary.md is written there")
    p.add_argument("--mode", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--status", action="append", default=[], metavar="STAGE=STATE")
    args = p.parse_args(argv)
    status = dict(s.split("=", 1) for s in args.status)
    text = render(args.out, args.mode, args.steps, status)
    (args.out / "summary.md").write_text(text)
    print(text, end="")
    print(f"gpu_check: wrote {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

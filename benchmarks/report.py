"""The benchmark's report: machine facts, the results table, ratios against the peers, the issue's targets."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
from pathlib import Path
from typing import Any

import torch

from benchmarks import measure

#: the targets of issue 6: (device type, shape, peer, metric, minimum); metric "train"/"sample" compares img/s,
#: "train_flops" compares achieved FLOP/s (equal-FLOPs comparison), "train_limit" is ours' fraction of the limit
TARGETS = [
    ("cpu", "cifar10", "diffusers", "train", 1.25),
    ("cpu", "cifar10", "diffusers", "sample", 1.5),
    ("cpu", "cifar10", None, "train_limit", 0.75),
    ("cpu", "mnist", "denoising-diffusion-pytorch", "train_flops", 1.0),
    ("cuda", "cifar10", "diffusers", "train", 2.0),
    ("cuda", "cifar10", None, "train_limit", 0.40),
]
MIB = 2**20
#: a 1-minute load average above this before the run marks the figures as taken under load
BUSY_LOAD = 0.5


def machine_facts(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Date, software, hardware and how busy the machine is as the run starts."""
    if device.type == "cuda":
        hardware = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host CPU {measure.cpu_name()}"
    else:
        hardware = f"{measure.cpu_name()}, {os.cpu_count()} logical cores, {args.threads} torch threads"
    return {
        "device": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware,
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
        "load_before": measure.load_average(),
        "busy_before": measure.busy_processes(),
    }


def limit(device: torch.device, precision: str, matmul_rates: list[float]) -> tuple[float, str]:
    """The FLOP/s that 100% stands for: a GPU's data-sheet bf16 peak, else the best matmul rate measured here."""
    peak = measure.gpu_bf16_peak(device) if precision == "bf16" else None
    if peak is not None:
        return peak, f"{torch.cuda.get_device_name(device)} data-sheet dense bf16 peak"
    dtype = "bf16" if precision == "bf16" else "fp32"
    n = measure.MATMUL_SIZE.get(device.type, 2048)
    return max(matmul_rates), f"best {dtype} {n}x{n} matmul rate measured in this run"


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if value < 10 ** (digits - 1) else f"{value:.0f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def results_table(shapes: list[dict], limit_flops: float, sample_steps: int) -> list[str]:
    lines = [
        f"| shape | implementation | params | train GFLOP/img | train img/s | train % of limit | DDIM-{sample_steps} "
        "GFLOP/img | sample img/s | sample % of limit | train mem MiB | sample mem MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in shapes:
        for r in s["results"]:
            train_frac = r.train * r.train_flops / limit_flops
            sample_frac = r.sample * r.sample_flops / limit_flops
            lines.append(
                f"| {s['shape'].name} | {r.impl} | {r.params / 1e6:.2f}M | {r.train_flops / 1e9:.3g} | "
                f"{fmt(r.train)} | {train_frac:.0%} | {r.sample_flops / 1e9:.4g} | {fmt(r.sample)} | "
                f"{sample_frac:.0%} | {_mib(r.train_mem)} | {_mib(r.sample_mem)} |"
            )
    return lines


def ratio(ours: Any, peer: Any, metric: str) -> float:
    """ours / peer: img/s for "train"/"sample"; achieved FLOP/s for "train_flops"/"sample_flops"."""
    if metric in ("train", "sample"):
        return getattr(ours, metric) / getattr(peer, metric)
    kind = metric.removesuffix("_flops")
    return getattr(ours, kind) * getattr(ours, f"{kind}_flops") / (getattr(peer, kind) * getattr(peer, f"{kind}_flops"))


def ratios_table(shapes: list[dict]) -> list[str]:
    lines = [
        "| shape | ours vs | train img/s | train FLOP/s | sample img/s | sample FLOP/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in shapes:
        ours = next((r for r in s["results"] if r.impl == "ours"), None)
        for peer in s["results"]:
            if ours is None or peer is ours:
                continue
            cells = [f"{ratio(ours, peer, m):.2f}x" for m in ("train", "train_flops", "sample", "sample_flops")]
            lines.append(f"| {s['shape'].name} | {peer.impl} | " + " | ".join(cells) + " |")
    return lines


def targets(shapes: list[dict], device: torch.device, limit_flops: float) -> list[str]:
    lines = []
    by_name = {s["shape"].name: {r.impl: r for r in s["results"]} for s in shapes}
    for dev, shape, peer, metric, minimum in TARGETS:
        results = by_name.get(shape, {})
        if dev != device.type or "ours" not in results or (peer is not None and peer not in results):
            continue
        ours = results["ours"]
        if metric == "train_limit":
            value, what = ours.train * ours.train_flops / limit_flops, "ours' training FLOP/s / limit"
            text = f"{value:.0%} (target >= {minimum:.0%})"
        else:
            value, what = ratio(ours, results[peer], metric), f"{metric.replace('_', ' ')} ours / {peer}"
            text = f"{value:.2f}x (target >= {minimum:.2f}x)"
        lines.append(f"- {shape}, {what}: {text}: **{'met' if value >= minimum else 'not met'}**")
    return lines


def render(shapes: list[dict], machine: dict, limit_flops: float, limit_name: str, matmul_rates: list[float],
           args: argparse.Namespace, argv: list[str]) -> str:  # fmt: skip
    """The markdown report: how it was run, on what, the tables, the targets and the notes."""
    load = machine["load_before"]
    busy = machine["busy_before"] + [f"{p} (at the end)" for p in machine["busy_after"]]
    versions = {r.impl: r.version for s in shapes for r in s["results"]}
    lines = [
        "# Benchmarks",
        "",
        "Produced by `python -m benchmarks.bench` (see benchmarks/README.md for the method); do not edit by hand.",
        "",
        f"- date: {machine['date']}",
        f"- command: `python -m benchmarks.bench {shlex.join(argv)}`",
        f"- hardware: {machine['hardware']}",
        f"- software: {machine['software']}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- precision: {args.precision}; limit (100%): {limit_name}, {limit_flops / 1e9:.1f} GFLOP/s "
        f"(per round: {', '.join(f'{r / 1e9:.1f}' for r in matmul_rates)})",
        f"- machine load: 1-minute load average {'n/a' if load is None else f'{load:.2f}'} before the run; "
        + (f"other busy processes: {'; '.join(busy)}" if busy else "no other busy process seen"),
    ]
    lines.append(
        "- memory: peak above what was allocated when the step began (weights, gradients, optimizer and EMA state "
        "excluded); "
        + ("CUDA max_memory_allocated" if machine["device"] == "cuda" else "CPU resident set size, polled every 2 ms")
    )
    if (load is not None and load > BUSY_LOAD) or busy:
        lines.append("- **taken under load**: other processes competed for the cores, so the figures are noisy")
    for s in shapes:
        st = s["settings"]
        lines.append(
            f"- {s['shape'].name}: train batch {st['train_batch']}, {args.warmup_steps} warm-up + "
            f"{st['train_steps']} timed steps per round; DDIM-{args.sample_steps} at batch {st['sample_batch']}; "
            f"{args.rounds} rounds, median shown"
        )
    lines += ["", "## Results", ""] + results_table(shapes, limit_flops, args.sample_steps)
    lines += ["", "## Ours relative to each peer", ""] + ratios_table(shapes)
    target_lines = targets(shapes, torch.device(machine["device"]), limit_flops)
    if target_lines:
        lines += ["", "## Targets (issue 6)", ""] + target_lines
    lines += ["", "## Per-round figures (img/s)", ""]
    for s in shapes:
        for r in s["results"]:
            train = ", ".join(fmt(v) for v in r.train_ips)
            sample = ", ".join(fmt(v) for v in r.sample_ips)
            lines.append(f"- {s['shape'].name} {r.impl}: train {train}; sample {sample}")
    notes = [n for s in shapes for n in s["notes"]]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def emit(text: str, output: Path | None) -> None:
    """Print a report and, when asked, write it to ``output``."""
    print(text)
    if output:
        output.write_text(text)
        print(f"wrote {output}")

"""Seconds per sample at equal quality: our fast solver against diffusers' DDIM-50 pipeline and lucidrains' default
sampler, on the same network shape, interleaved in one process.

    python -m benchmarks.fast_sampling --output benchmarks/FAST_SAMPLING.md
    python -m benchmarks.fast_sampling --sampler dpmpp_2m --num_steps 10 --shape mnist

"Equal quality" is measured elsewhere, on trained checkpoints: ``ddpm sweep --nfe`` (docs/samplers.md, "Quality per
network evaluation") finds the NFE at which the solver reaches DDIM-50's FID. This script times what each takes to
draw a sample at that setting (untrained weights: time does not depend on them). Rows, each as its users run it:

* ours, the fast setting (default DPM-Solver++(2M), 10 steps) and ours DDIM-50 (the quality reference);
* diffusers' DDIMPipeline-style loop at 50 steps (``DDPMPipeline`` with a DDIM scheduler, as in bench.py);
* denoising-diffusion-pytorch's default sampler: ancestral sampling over all T steps (``sampling_timesteps=None``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks import measure, report
from benchmarks.bench import REPO, SHAPES, prepare, rotated
from benchmarks.impls import Impl, Ours, build_impls, load_shape
from ddpm_lightning.sampling import SamplingConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fast_sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"] + ["tiny"], default="mnist")
    p.add_argument("--sampler", default="dpmpp_2m", help="our fast sampler (a name of the registry)")
    p.add_argument("--num_steps", type=int, default=10, help="its steps")
    p.add_argument("--batch", type=int, default=16, help="samples per timed call")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--impls", nargs="+", default=["ours", "diffusers", "lucidrains"], help="implementations to time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--output", type=Path, default=None, help="also write the table here (markdown)")
    return p.parse_args(argv)


def _timed(fn) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def _ours(module: torch.nn.Module, sampling: SamplingConfig, batch: int) -> torch.Tensor:
    return module.sample(batch, sampling=sampling)


def contenders(impls: list[Impl], fast: SamplingConfig, num_timesteps: int) -> list[tuple[str, int, object]]:
    """(row name, NFE per sample, callable of the batch size) for every row that can be built here."""
    rows = []
    for impl in impls:
        if isinstance(impl, Ours):
            module = impl.module.to(impl.device).eval()
            ddim50 = SamplingConfig(sampler="ddim", num_steps=50)
            rows.append((f"ours, {fast.tag(False)}", fast.nfe(num_timesteps), partial(_ours, module, fast)))
            rows.append(("ours, ddim50", 50, partial(_ours, module, ddim50)))
        elif impl.name == "diffusers":
            rows.append(("diffusers, DDIM-50 pipeline", 50, lambda b, i=impl: i.sample(b, 50)))
        else:
            rows.append(
                (f"{impl.name}, default sampler (T steps)", num_timesteps, lambda b, i=impl: i.sample(b, num_timesteps))
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare(args)
    config, overrides = SHAPES[args.shape]
    shape = load_shape(args.shape, REPO / config, overrides)
    fast = SamplingConfig(sampler=args.sampler, num_steps=args.num_steps)
    impls, notes = build_impls(args.impls, shape, device, "fp32")
    T = shape.model_args.get("num_timesteps", 1000)
    rows = contenders(impls, fast, T)
    load = measure.load_average()
    for _, _, run in rows:  # warm-up: one sample each
        run(1)
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for r in range(args.rounds):
        for name, _, run in rotated(rows, r):
            seconds[name].append(_timed(lambda run=run: run(args.batch)) / args.batch)
            print(f"  round {r + 1} {name}: {seconds[name][-1]:.4f} s/sample", flush=True)
    fast_s = statistics.median(seconds[rows[0][0]])
    lines = [
        "# Seconds per sample at equal quality",
        "",
        f"Produced by `python -m benchmarks.fast_sampling {' '.join(argv if argv is not None else sys.argv[1:])}`;"
        " do not edit by hand.",
        "",
        f"- shape: {args.shape} (the U-Net of {config}), untrained weights, fp32, device {device}, "
        f"{torch.get_num_threads()} threads; batch {args.batch}, {args.rounds} rounds (order rotates), median",
        f"- 1-minute load average before the run: {load if load is not None else 'n/a'}",
        "- equal quality: the fast setting reaches DDIM-50's classifier FID on the trained MNIST checkpoints "
        '(docs/samplers.md, "Quality per network evaluation")',
        *[f"- {note}" for note in notes],
        "",
        "| sampler | NFE per sample | seconds per sample | ours-fast is faster by |",
        "|---|---:|---:|---:|",
    ]
    for name, nfe, _ in rows:
        s = statistics.median(seconds[name])
        lines.append(f"| {name} | {nfe} | {s:.4f} | {s / fast_s:.1f}x |")
    text = "\n".join(lines) + "\n"
    report.emit(text, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

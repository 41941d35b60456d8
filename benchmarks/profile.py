"""Where a training step or a sampling step spends its time: the torch.profiler operator table of one implementation.

    python -m benchmarks.profile --shape cifar10 --impl ours --mode train --batch 8
    python -m benchmarks.profile --shape cifar10 --impl diffusers --mode sample --batch 8

Training profiles one steady-state step (after a warm-up step); sampling profiles a run of ``--sample-steps`` DDIM
steps. The table is sorted by self time, so convolutions, norms and copies show up as themselves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench import REPO, SHAPES, resolve_device
from benchmarks.impls import IMPLS, load_shape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="cifar10", choices=list(SHAPES))
    p.add_argument("--impl", default="ours", choices=list(IMPLS))
    p.add_argument("--mode", default="train", choices=["train", "sample"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--output", type=Path, help="also write the table here, with the command that made it")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    config, overrides = SHAPES[args.shape]
    shape = load_shape(args.shape, REPO / config, overrides)
    impl = IMPLS[args.impl](shape, device, args.precision)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if args.mode == "train":
        images = torch.rand(args.batch, shape.in_channels, shape.image_size, shape.image_size) * 2 - 1
        prof = profile(activities=activities)
        impl.train(images, 2, lambda step: prof.start() if step == 0 else prof.stop())  # profile step 1
    else:
        impl.sample(args.batch, 1)  # warm-up
        with profile(activities=activities) as prof:
            impl.sample(args.batch, args.sample_steps)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
    print(table)
    if args.output:
        argv = " ".join(sys.argv[1:])
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(f"python -m benchmarks.profile {argv}\n{device}, torch {torch.__version__}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

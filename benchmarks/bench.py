"""Benchmark: our trainer against diffusers and denoising-diffusion-pytorch, interleaved in one process.

    python -m benchmarks.bench                                  # both shapes, CPU fp32 or GPU, peers if installed
    python -m benchmarks.bench --output BENCHMARKS.md           # also write the report (what `make bench` does)
    python -m benchmarks.bench --device cuda --precision bf16   # on a GPU

For each shape (the model of ``configs/mnist.yaml`` and of ``configs/cifar10.yaml``) and implementation it measures
training throughput (img/s of the full step: forward, backward, clipping, optimizer, EMA), DDIM sampling throughput,
peak memory, FLOPs per image and the achieved FLOP/s as a fraction of the machine's limit. The implementations take
turns within each round (the order rotates), so a change in the machine's load hits all of them alike; the table
shows the median over the rounds. See benchmarks/README.md for the method.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import measure, report
from benchmarks.impls import IMPLS, Impl, Shape, autocast, build_impls, load_shape

REPO = Path(__file__).resolve().parents[1]
#: the benchmark shapes: a recipe and overrides of its model section ("tiny" is the test suite's plumbing shape)
SHAPES = {
    "mnist": ("configs/mnist.yaml", {}),
    "cifar10": ("configs/cifar10.yaml", {}),
    "tiny": (
        "configs/mnist.yaml",
        {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [14]}
        | {"num_groups": 4},
    ),
}
#: default (train batch, sample batch) per shape and device: CPU batches keep a round to a minute or two
BATCHES = {
    ("mnist", "cpu"): (128, 64),
    ("cifar10", "cpu"): (8, 8),
    ("tiny", "cpu"): (4, 4),
    ("mnist", "cuda"): (128, 256),
    ("cifar10", "cuda"): (128, 256),
    ("tiny", "cuda"): (4, 4),
}
#: default timed training steps per round (after the warm-up step): enough to average, few on the slow CPU
TRAIN_STEPS = {"cpu": 3, "cuda": 20}


@dataclass
class Result:
    """What was measured for one implementation at one shape."""

    impl: str
    version: str
    params: int
    train_flops: float  # per image, forward + backward
    sample_flops: float  # per image, all sampling steps
    train_ips: list[float] = field(default_factory=list)  # img/s per round
    sample_ips: list[float] = field(default_factory=list)
    train_mem: int | None = None  # bytes above the step's start
    sample_mem: int | None = None

    @property
    def train(self) -> float:
        return statistics.median(self.train_ips)

    @property
    def sample(self) -> float:
        return statistics.median(self.sample_ips)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["mnist", "cifar10"], choices=list(SHAPES))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (GPUs)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the table shows the median")
    p.add_argument("--train-batch", type=int, help="override the per-shape default training batch")
    p.add_argument("--sample-batch", type=int, help="override the per-shape default sampling batch")
    p.add_argument("--train-steps", type=int, help="timed training steps per round (default: CPU 3, GPU 20)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed training steps before the timed ones")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per sample")
    p.add_argument("--output", type=Path, help="write the report (markdown) here, e.g. BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup_steps < 1:
        p.error("--rounds and --warmup-steps must be >= 1")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rotated(items: list | tuple, round_index: int) -> list:
    """``items`` starting at ``round_index`` (mod their number): who goes first changes every round."""
    k = round_index % len(items)
    return list(items[k:]) + list(items[:k])


def training_step_times(impl: Impl, images: torch.Tensor, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` steps after ``warmup`` untimed ones (clock read at each step's end)."""
    stamps: list[float] = []

    def on_step_end(step: int) -> None:
        measure.synchronize(impl.device)
        stamps.append(time.perf_counter())

    impl.train(images, warmup + steps, on_step_end)
    return [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:])]


def time_training(impl: Impl, images: torch.Tensor, warmup: int, steps: int) -> float:
    """Training img/s over ``steps`` steps after ``warmup`` untimed ones."""
    return images.shape[0] * steps / sum(training_step_times(impl, images, warmup, steps))


def time_sampling(impl: Impl, batch: int, steps: int) -> float:
    """Sampling img/s of one ``steps``-step DDIM run at ``batch``."""
    measure.synchronize(impl.device)
    start = time.perf_counter()
    impl.sample(batch, steps)
    measure.synchronize(impl.device)
    return batch / (time.perf_counter() - start)


def count(impl: Impl, shape: Shape, sample_steps: int) -> Result:
    """Parameters and FLOPs per image (training: forward + backward; sampling: ``sample_steps`` forwards)."""
    x = torch.randn(2, shape.in_channels, shape.image_size, shape.image_size, device=impl.device)
    with autocast(impl.device, impl.precision):
        train = measure.flops_per_image(impl.forward, impl.net, x, train=True)
        forward = measure.flops_per_image(impl.forward, impl.net, x, train=False)
    params = sum(p.numel() for p in impl.net.parameters())
    return Result(impl.name, impl.version, params, train, forward * sample_steps)


def warm_up_and_measure_memory(impl: Impl, result: Result, images: torch.Tensor, sample_batch: int, warmup: int):
    """First calls (optimizer state, kernels, caches), measuring the peak memory of the next training step and of a
    sampling run (whose peak is that of one step, so two steps do)."""
    memory = measure.PeakMemory(impl.device)

    def on_step_end(step: int) -> None:
        if step == warmup - 1:  # the next step is a steady-state one: measure it
            memory.start()
        elif step == warmup:
            result.train_mem = memory.stop()

    impl.train(images, warmup + 1, on_step_end)
    memory.start()
    impl.sample(sample_batch, 2)
    result.sample_mem = memory.stop()


def bench_shape(name: str, args: argparse.Namespace, device: torch.device, limits: list[float]) -> dict:
    """All measurements at one shape; appends the per-round matmul limits to ``limits``."""
    config, overrides = SHAPES[name]
    shape = load_shape(name, REPO / config, overrides)
    default_train, default_sample = BATCHES[(name, device.type)]
    train_batch, sample_batch = args.train_batch or default_train, args.sample_batch or default_sample
    steps = args.train_steps or TRAIN_STEPS[device.type]
    impls, notes = build_impls(args.impls, shape, device, args.precision)
    print(f"[{name}] {', '.join(i.name for i in impls)}; train batch {train_batch}, sample batch {sample_batch}")
    images = torch.rand(train_batch, shape.in_channels, shape.image_size, shape.image_size) * 2 - 1  # [-1, 1]
    results = {impl.name: count(impl, shape, args.sample_steps) for impl in impls}
    for impl in impls:
        warm_up_and_measure_memory(impl, results[impl.name], images, sample_batch, args.warmup_steps)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    for r in range(args.rounds):
        limits.append(measure.matmul_rate(device, dtype))
        order = rotated(impls, r)
        for impl in order:
            results[impl.name].train_ips.append(time_training(impl, images, args.warmup_steps, steps))
            print(f"  round {r + 1} {impl.name}: train {results[impl.name].train_ips[-1]:.2f} img/s", flush=True)
        for impl in order:
            results[impl.name].sample_ips.append(time_sampling(impl, sample_batch, args.sample_steps))
            print(f"  round {r + 1} {impl.name}: sample {results[impl.name].sample_ips[-1]:.3f} img/s", flush=True)
    settings = {"train_batch": train_batch, "sample_batch": sample_batch, "train_steps": steps}
    return {"shape": shape, "results": list(results.values()), "notes": notes, "settings": settings}


def prepare(args: argparse.Namespace) -> torch.device:
    """The device of ``--device``, ``--threads`` on a CPU and the seed, as every benchmark script sets them."""
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare(args)
    machine = report.machine_facts(device, args)
    limits: list[float] = []
    shapes = [bench_shape(name, args, device, limits) for name in args.shapes]
    machine["busy_after"] = measure.busy_processes()
    limit, limit_name = report.limit(device, args.precision, limits)
    text = report.render(shapes, machine, limit, limit_name, limits, args, sys.argv[1:] if argv is None else argv)
    report.emit(text, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Before/after figures for each speed switch of our trainer, variants interleaved in one process.

    python -m benchmarks.ablate                                        # both shapes, every switch
    python -m benchmarks.ablate --output benchmarks/ABLATIONS.md       # also write the report (`make bench` does)
    python -m benchmarks.ablate --compile                              # and torch.compile (minutes of compiling)
    python -m benchmarks.ablate --shapes mnist --skip optimizer        # one shape, some switches

Each switch is measured against the recipe as shipped (``configs/mnist.yaml``, ``configs/cifar10.yaml``) with only that
switch changed; the first variant of each row is the baseline its ratios are taken against. Training is ``ddpm fit``'s
full step (as in ``benchmarks.bench``); sampling is a DDIM run of ``--sample-steps`` steps (fewer than the bench's 50,
to keep a round short: img/s of DDIM-50 is that of DDIM-10 divided by 5). The variants take turns within each round,
in an order that rotates, and the tables show the median over the rounds with every round's figure beside it.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks import measure, report
from benchmarks.bench import BATCHES, REPO, SHAPES, resolve_device, rotated, time_sampling, training_step_times
from benchmarks.impls import Ours, Shape, copy_shape, load_shape
from ddpm_lightning.callbacks import EMA

#: timed training steps per round (more than the bench's: the effects measured here are a few percent)
ABLATE_TRAIN_STEPS = {"cpu": 4, "cuda": 20}


@dataclass(frozen=True)
class Variant:
    """One setting of a switch: a label and the changes to the recipe's model arguments / optimizer switches."""

    label: str
    model: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)

    def apply(self, shape: Shape) -> Shape:
        return copy_shape(
            shape,
            model_args=shape.model_args | self.model,
            optimizer_switches={**shape.optimizer_switches, **self.optimizer},
        )


@dataclass(frozen=True)
class Ablation:
    name: str
    what: str
    variants: tuple[Variant, ...]
    modes: tuple[str, ...]  # "train", "sample"


ABLATIONS = (
    Ablation(
        "channels_last",
        "`model.channels_last`: the network's weights (and so its activations) in NHWC instead of NCHW",
        (Variant("NCHW", model={"channels_last": False}), Variant("channels_last", model={"channels_last": True})),
        ("train", "sample"),
    ),
    Ablation(
        "optimizer",
        "`model.optimizer.init_args.fused` / `foreach`: how Adam(W) computes its update (the result is the same)",
        (
            Variant("per-parameter loop", optimizer={"fused": None, "foreach": False}),
            Variant("foreach", optimizer={"fused": None, "foreach": True}),
            Variant("fused", optimizer={"fused": True, "foreach": None}),
        ),
        ("train",),
    ),
    Ablation(
        "compile",
        "`model.torch_compile`: torch.compile of the network (the compilation itself is left out of the timing)",
        (Variant("eager", model={"torch_compile": False}), Variant("compiled", model={"torch_compile": True})),
        ("train",),
    ),
)


@dataclass
class Row:
    """The figures of one variant, and the time of its first (warm-up) fit.

    ``ips[mode]`` holds one img/s per round (training: over the round's timed steps); ``step_ips`` every timed
    training step's img/s, whose median is the training figure (robust to a step slowed by something else).
    """

    label: str
    ips: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "sample": []})
    step_ips: list[float] = field(default_factory=list)
    first_fit_s: float = 0.0

    def figure(self, mode: str) -> float | None:
        values = self.step_ips if mode == "train" else self.ips[mode]
        return statistics.median(values) if values else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["mnist", "cifar10"], choices=list(SHAPES))
    names = [a.name for a in ABLATIONS] + ["ema", "sample_batch"]
    p.add_argument("--skip", nargs="*", default=[], choices=names, help="switches to leave out")
    p.add_argument(
        "--compile",
        action="store_true",
        help="measure torch_compile too (compiling took 2-10 min per shape on a 2-core CPU)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows the median")
    p.add_argument("--train-steps", type=int, help="timed training steps per round (default: CPU 4, GPU 20)")
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of a sampling run")
    p.add_argument("--output", type=Path, help="write the report (markdown) here, e.g. benchmarks/ABLATIONS.md")
    p.add_argument("--data_root", type=Path, help="real MNIST here (torchvision layout): time the mnist loader too")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if not args.compile:
        args.skip.append("compile")
    return args


def run_ablation(ablation: Ablation, shape: Shape, device: torch.device, args: argparse.Namespace) -> list[Row]:
    """The variants of one switch at one shape, interleaved over the rounds."""
    train_batch, sample_batch = BATCHES[(shape.name, device.type)]
    steps = args.train_steps or ABLATE_TRAIN_STEPS[device.type]
    images = torch.rand(train_batch, shape.in_channels, shape.image_size, shape.image_size) * 2 - 1
    impls = [Ours(v.apply(shape), device, "fp32") for v in ablation.variants]
    rows = [Row(v.label) for v in ablation.variants]
    for impl, row in zip(impls, rows):  # first calls: optimizer state, kernels, compilation
        start = time.perf_counter()
        impl.train(images, 1, lambda step: None)
        row.first_fit_s = time.perf_counter() - start
        if "sample" in ablation.modes:
            impl.sample(sample_batch, 1)
    for r in range(args.rounds):
        for i in rotated(range(len(impls)), r):
            if "train" in ablation.modes:
                seconds = training_step_times(impls[i], images, 1, steps)
                rows[i].step_ips += [train_batch / t for t in seconds]
                rows[i].ips["train"].append(train_batch * len(seconds) / sum(seconds))
            if "sample" in ablation.modes:
                rows[i].ips["sample"].append(time_sampling(impls[i], sample_batch, args.sample_steps))
        done = "; ".join(
            f"{row.label} " + ", ".join(f"{m} {v[-1]:.3g}" for m, v in row.ips.items() if v) for row in rows
        )
        print(f"  [{shape.name}] {ablation.name} round {r + 1}: {done} img/s", flush=True)
    return rows


def time_ema_updates(shape: Shape, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per EMA update over the shape's weights: our foreach lerp against a per-parameter loop."""
    model = Ours(shape, device, "fp32").module
    averaged = [p.detach().clone() for p in model.parameters()]
    current = [p.detach() for p in model.parameters()]
    ema = EMA(decay=0.999)

    def loop(avg: list[torch.Tensor], cur: list[torch.Tensor], n: torch.Tensor) -> None:
        for a, c in zip(avg, cur):  # one kernel per parameter, as AveragedModel's default and diffusers' EMAModel
            a.lerp_(c, 1.0 - 0.999)

    fns: dict[str, Callable] = {"per-parameter loop": loop, "foreach lerp (ours)": ema.multi_avg}
    n = torch.tensor(100)
    return _ms_per_call({k: partial(fn, averaged, current, n) for k, fn in fns.items()}, device, repeats)


def time_optimizer_updates(shape: Shape, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per optimizer update (``step`` alone, gradients in place) over the shape's weights, for each
    implementation of the recipe's optimizer: the part of the step the switch changes, measured without the rest."""
    model = Ours(shape, device, "fp32").module
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    variants = next(a for a in ABLATIONS if a.name == "optimizer").variants
    optimizers = {v.label: partial(shape.optimizer, **{**shape.optimizer_switches, **v.optimizer}) for v in variants}
    built = {label: make(model.parameters()) for label, make in optimizers.items()}
    return _ms_per_call({label: opt.step for label, opt in built.items()}, device, repeats)


def _ms_per_call(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each function: ``repeats`` interleaved rounds of 5 calls after a warm call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()  # warm (an optimizer allocates its state on the first step)
            measure.synchronize(device)
            start = time.perf_counter()
            for _ in range(5):
                fn()
            measure.synchronize(device)
            times[name].append((time.perf_counter() - start) / 5 * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def time_sample_batches(shape: Shape, device: torch.device, args: argparse.Namespace) -> dict[int, list[float]]:
    """Sampling img/s at growing batch sizes (one model, the recipe's switches), interleaved over the rounds."""
    impl = Ours(shape, device, "fp32")
    batches = {"cpu": (1, 8, 32), "cuda": (1, 32, 256)}[device.type]
    impl.sample(batches[0], 1)
    out: dict[int, list[float]] = {b: [] for b in batches}
    for r in range(args.rounds):
        for b in rotated(batches, r):
            out[b].append(time_sampling(impl, b, args.sample_steps))
        print(f"  [{shape.name}] sample batch round {r + 1}: " + ", ".join(f"{b}: {v[-1]:.3g}" for b, v in out.items()))
    return out


def time_data_loading(data_root: Path, batch: int, num_batches: int = 40) -> float:
    """img/s of the MNIST training loader as ``ddpm fit`` runs it (in-process, num_workers 0), batch transform
    included: what the step would wait for if loading were not overlapped at all."""
    from ddpm_lightning.data import MNISTDataModule

    dm = MNISTDataModule(root=str(data_root), download=False, batch_size=batch, num_workers=0)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader)
    start = time.perf_counter()
    for _ in range(num_batches):
        dm.on_after_batch_transfer(next(loader), 0)
    return batch * num_batches / (time.perf_counter() - start)


def _recipe_train(res: dict) -> float:
    """Training img/s of the recipe as shipped: the variant of the first ablation that matches its settings."""
    for ablation, rows in res["ablations"]:
        for variant, row in zip(ablation.variants, rows):
            if all(res["shape"].model_args.get(k, False) == v for k, v in variant.model.items()) and variant.model:
                return row.figure("train") or 0.0
    return 0.0


def render(results: list[dict], machine: dict, args: argparse.Namespace, argv: list[str]) -> str:
    load = machine["load_before"]
    busy = machine["busy_before"] + [f"{p} (at the end)" for p in machine["busy_after"]]
    train_steps = args.train_steps or ABLATE_TRAIN_STEPS[machine["device"]]
    lines = [
        "# Speed switches, before and after",
        "",
        "Produced by `python -m benchmarks.ablate` (`make bench` runs it after `benchmarks.bench`); do not edit by "
        "hand. Each switch is changed alone, from the recipe as shipped; ratios are against the row's first variant.",
        "",
        f"- date: {machine['date']}",
        f"- command: `python -m benchmarks.ablate {' '.join(argv)}`",
        f"- hardware: {machine['hardware']}",
        f"- software: {machine['software']}",
        f"- machine load: 1-minute load average {'n/a' if load is None else f'{load:.2f}'} before the run; "
        + (f"other busy processes: {'; '.join(busy)}" if busy else "no other busy process seen"),
        f"- training: the full `ddpm fit` step, 1 warm-up + {train_steps} timed steps per round, median over all "
        f"timed steps shown; sampling: one DDIM-{args.sample_steps} run per round, median over the {args.rounds} "
        "rounds shown; per-round figures beside them",
    ]
    if (load is not None and load > report.BUSY_LOAD) or busy:
        lines.append("- **taken under load**: other processes competed for the cores, so the figures are noisy")
    measured = {a.name for res in results for a, _ in res["ablations"]}
    lines += ["", "Switches:", ""] + [f"- **{a.name}**: {a.what}" for a in ABLATIONS if a.name in measured]
    if "compile" in measured:
        lines.append(
            "- the first-fit column is the first `fit` of a variant (one step): for `compiled` it is the compilation, "
            "from an empty inductor cache"
        )
    for res in results:
        shape: Shape = res["shape"]
        train_batch, sample_batch = BATCHES[(shape.name, machine["device"])]
        lines += ["", f"## {shape.name} (train batch {train_batch}, sample batch {sample_batch})", ""]
        lines += [
            "| switch | variant | train img/s | x | sample img/s | x | first fit s | per round (train; sample) |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for ablation, rows in res["ablations"]:
            base = rows[0]
            for row in rows:
                cells = [ablation.name if row is base else "", row.label]
                for mode in ("train", "sample"):
                    v, b = row.figure(mode), base.figure(mode)
                    cells += ["", ""] if v is None or b is None else [report.fmt(v), f"{v / b:.2f}x"]
                rounds = "; ".join(
                    ", ".join(report.fmt(x) for x in row.ips[m]) for m in ("train", "sample") if row.ips[m]
                )
                cells += [f"{row.first_fit_s:.1f}", rounds]
                lines.append("| " + " | ".join(cells) + " |")
        recipe_ips = _recipe_train(res)
        if res.get("optimizer_update"):
            cells = ", ".join(f"{k} {v:.1f} ms" for k, v in res["optimizer_update"].items())
            step = f"; a whole training step of the recipe takes about {1e3 * train_batch / recipe_ips:.0f} ms here"
            lines += [
                "",
                f"Optimizer update alone (its `step()` over all weights): {cells}{step if recipe_ips else ''}.",
            ]
        if res.get("ema"):
            cells = ", ".join(f"{k} {v:.1f} ms" for k, v in res["ema"].items())
            lines += ["", f"EMA update over all weights: {cells}."]
        if res.get("sample_batch"):
            cells = ", ".join(
                f"batch {b}: {report.fmt(statistics.median(v))} img/s" for b, v in res["sample_batch"].items()
            )
            lines += ["", f"DDIM-{args.sample_steps} sampling by batch size (recipe as shipped): {cells}."]
        if res.get("loader") and recipe_ips:
            lines += [
                "",
                f"Data: the real-MNIST training loader (`--data_root`, in-process, uint8 batches, batch transform "
                f"included) delivers {report.fmt(res['loader'])} img/s, so loading costs at most "
                f"{100 * recipe_ips / res['loader']:.2g}% of a training step at the shipped recipe's speed.",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "compile" not in args.skip:  # compile from scratch, so that the first-fit column is the real compile time
        cache = tempfile.mkdtemp(prefix="ablate-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = report.machine_facts(device, args)
    results = []
    for name in args.shapes:
        config, overrides = SHAPES[name]
        shape = load_shape(name, REPO / config, overrides)
        res: dict[str, Any] = {"shape": shape, "ablations": []}
        for ablation in ABLATIONS:
            if ablation.name not in args.skip:
                res["ablations"].append((ablation, run_ablation(ablation, shape, device, args)))
        if "ema" not in args.skip:
            res["ema"] = time_ema_updates(shape, device)
        if "optimizer" not in args.skip:
            res["optimizer_update"] = time_optimizer_updates(shape, device)
        if "sample_batch" not in args.skip:
            res["sample_batch"] = time_sample_batches(shape, device, args)
        if args.data_root is not None and config == "configs/mnist.yaml":  # the recipe reads MNIST
            res["loader"] = time_data_loading(args.data_root, BATCHES[(name, device.type)][0])
        results.append(res)
    machine["busy_after"] = measure.busy_processes()
    text = render(results, machine, args, sys.argv[1:] if argv is None else argv)
    report.emit(text, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

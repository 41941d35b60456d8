"""Training levers of the conditional MNIST recipe, measured in one run: bf16 against fp32, batch 64 against 128, a
wider or deeper U-Net, each as img/s of the full training step and as a fraction of the CPU's FMA peak; UniPC-10
sampling in fp32 and bf16; and whether bf16's loss curve follows fp32's over the same steps.

    python -m benchmarks.training                                  # throughput (3 rounds), loss curves (300 steps)
    python -m benchmarks.training --loss_steps 0 --rounds 5        # throughput only
    python -m benchmarks.training --output benchmarks/TRAINING.md  # also write the report

The cases take turns inside each round (the order rotates), so a change in the machine's load hits all alike; the
table shows the median over rounds. The speed of each case relative to the recipe (fp32, batch 128) is what
``experiments/studies/time_to_quality.yaml`` scales the step budgets of the variants that change a step's cost by.

FLOPs: ``torch.utils.flop_counter`` over one forward + backward (training) or forward (sampling) of the network, a
multiply-add counted as 2, matmuls / convolutions / attention only (norms, activations, the optimizer and EMA
updates are not counted). The limit is the CPU's FMA peak, ``cores x clock x FMA lanes x 2`` for the precision
(:func:`benchmarks.measure.cpu_fma_peak` says how the clock and the lanes were found).
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
from benchmarks.bench import REPO, prepare, rotated, training_step_times
from benchmarks.impls import Ours, Precision, autocast, load_shape

RECIPE = REPO / "configs" / "mnist_conditional.yaml"
#: the cases: name -> (model overrides, train batch, precision); the first is the reference of the ratios
CASES: dict[str, tuple[dict, int, Precision]] = {
    "recipe fp32 b128": ({}, 128, "fp32"),
    "recipe bf16 b128": ({}, 128, "bf16"),
    "recipe fp32 b64": ({}, 64, "fp32"),
    "recipe bf16 b64": ({}, 64, "bf16"),
    "width 48 fp32 b128": ({"base_channels": 48}, 128, "fp32"),
    "2 res blocks fp32 b128": ({"num_res_blocks": 2}, 128, "fp32"),
}
#: UniPC at 10 steps with guidance 3 (20 NFE), the recipe's metrics setting, at the metrics' batch
SAMPLING = {"sampler": "unipc", "num_steps": 10, "guidance_scale": 3.0}
SAMPLE_BATCH = 250


@dataclass
class Case:
    name: str
    impl: Ours
    batch: int
    precision: Precision
    flops: float = 0.0  # per image, forward + backward
    ips: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per case and round")
    p.add_argument("--warmup_steps", type=int, default=1)
    p.add_argument("--loss_steps", type=int, default=300, help="steps of the fp32/bf16 loss curves (0: skip)")
    p.add_argument("--loss_window", type=int, default=50, help="steps per point of the loss comparison")
    p.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"), help="real MNIST for the loss curves")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def build_cases(device: torch.device) -> list[Case]:
    cases = []
    for name, (overrides, batch, precision) in CASES.items():
        shape = load_shape(name, RECIPE, {"num_classes": 10, **overrides})  # num_classes is linked from the data
        impl = Ours(shape, device, precision)
        x = torch.randn(2, shape.in_channels, shape.image_size, shape.image_size, device=device)
        with autocast(device, precision):
            flops = measure.flops_per_image(impl.forward, impl.net, x, train=True)
        cases.append(Case(name, impl, batch, precision, flops))
    return cases


def time_sampling(case: Case, device: torch.device) -> float:
    """img/s of one UniPC-10 guided run at SAMPLE_BATCH."""
    labels = torch.arange(SAMPLE_BATCH) % 10
    case.impl.module.to(device)
    start = time.perf_counter()
    with autocast(device, case.precision):
        case.impl.module.sample(SAMPLE_BATCH, labels=labels, **SAMPLING)
    measure.synchronize(device)
    return SAMPLE_BATCH / (time.perf_counter() - start)


def loss_curve(precision: Precision, seed: int, steps: int, data_root: str, device: torch.device) -> list[float]:
    """Training losses of the recipe (its model, fused AdamW, clipping) over ``steps`` steps of real MNIST in a fixed
    order; ``seed`` fixes the initialisation and every draw of t, noise and label dropout."""
    from torchvision.datasets import MNIST

    data = MNIST(data_root, train=True, download=False)
    images = data.data[: 128 * steps].float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
    labels = data.targets[: 128 * steps]
    torch.manual_seed(seed)
    shape = load_shape("loss", RECIPE, {"num_classes": 10})
    module = Ours(shape, device, precision).module
    optimizer = shape.optimizer(module.parameters(), **shape.optimizer_switches)
    losses = []
    for step in range(steps):
        x = images[step * 128 : (step + 1) * 128].to(device).contiguous(memory_format=torch.channels_last)
        y = labels[step * 128 : (step + 1) * 128].to(device)
        with autocast(device, precision):
            loss = module.training_step((x, y), step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), shape.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def window_means(losses: list[float], window: int) -> list[float]:
    return [statistics.fmean(losses[i : i + window]) for i in range(0, len(losses) - window + 1, window)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare(args)
    machine = report.machine_facts(device, args)
    peak = measure.cpu_fma_peak(args.threads)
    print(f"{machine['hardware']}; {peak['isa']}, bf16: {peak['bf16_isa']}; flags {' '.join(peak['flags'])}")
    cases = build_cases(device)
    for case in cases:  # warm-up: optimizer state, kernel selection
        training_step_times(case.impl, _images(case), args.warmup_steps, 1)
    sample_ips: dict[str, list[float]] = {"fp32": [], "bf16": []}
    samplers = {c.precision: c for c in cases if c.batch == 128 and c.name.startswith("recipe")}
    for r in range(args.rounds):
        for case in rotated(cases, r):
            times = training_step_times(case.impl, _images(case), args.warmup_steps, args.steps)
            case.ips.append(case.batch * len(times) / sum(times))
            print(f"  round {r + 1} {case.name}: {case.ips[-1]:.1f} img/s", flush=True)
        for precision in rotated(list(samplers), r):
            sample_ips[precision].append(time_sampling(samplers[precision], device))
            print(f"  round {r + 1} sampling {precision}: {sample_ips[precision][-1]:.1f} img/s", flush=True)
    curves = {}
    if args.loss_steps > 0:
        for name, (precision, seed) in {"fp32 seed 0": ("fp32", 0), "bf16 seed 0": ("bf16", 0)}.items():
            curves[name] = loss_curve(precision, seed, args.loss_steps, args.data_root, device)
            print(f"  loss curve {name}: last window {window_means(curves[name], args.loss_window)[-1]:.4f}")
        curves["fp32 seed 1"] = loss_curve("fp32", 1, args.loss_steps, args.data_root, device)
    machine |= {"load_after": measure.load_average(), "busy_after": measure.busy_processes()}
    text = render(cases, sample_ips, curves, peak, machine, args, argv)
    report.emit(text, args.output)
    return 0


def _images(case: Case) -> torch.Tensor:
    shape = case.impl.shape
    return torch.rand(case.batch, shape.in_channels, shape.image_size, shape.image_size) * 2 - 1


def render(cases, sample_ips, curves, peak, machine, args, argv) -> str:
    ref = statistics.median(cases[0].ips)
    gf = 1e9
    lines = [
        "# Training levers: throughput on this CPU",
        "",
        f"Written by `python -m benchmarks.training {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{machine['date']}: {machine['hardware']}; {machine['software']}. Load average before/after: "
        f"{_load(machine['load_before'])} / {_load(machine['load_after'])}; other busy processes before: "
        f"{', '.join(machine['busy_before']) or 'none'}.",
        "",
        f"**CPU:** {peak['isa']} ({' '.join(peak['flags'])}); bf16 compute: {peak['bf16_isa']}. **FMA peak** = "
        f"{peak['cores']} cores x {peak['clock_hz'] / 1e9:.3f} GHz ({peak['clock_source']}) x FMA lanes x 2: fp32 "
        f"{peak['fp32_fma_lanes']} lanes = {peak['fp32'] / gf:.1f} GFLOP/s, bf16 {peak['bf16_fma_lanes']} lanes = "
        f"{peak['bf16'] / gf:.1f} GFLOP/s. FLOPs: forward + backward of the network, a multiply-add counted as 2, "
        "matmuls / convolutions / attention only.",
        "",
        f"Model: `{RECIPE.relative_to(REPO)}` (conditional U-Net, channels-last, fused AdamW, EMA, clipping); the full "
        f"Lightning training step on synthetic data; median of {args.rounds} rounds of {args.steps} steps.",
        "",
        "| case | img/s | vs recipe fp32 b128 | GFLOP/image | achieved GFLOP/s | % of FMA peak | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        ips = statistics.median(c.ips)
        achieved = ips * c.flops
        lines.append(
            f"| {c.name} | {ips:.1f} | {ips / ref:.2f}x | {c.flops / gf:.3f} | {achieved / gf:.1f} | "
            f"{100 * achieved / peak[c.precision]:.0f} % | {', '.join(f'{v:.0f}' for v in c.ips)} |"
        )
    s32, s16 = statistics.median(sample_ips["fp32"]), statistics.median(sample_ips["bf16"])
    lines += [
        "",
        f"Sampling, UniPC 10 steps with guidance 3 (20 NFE) at batch {SAMPLE_BATCH}: fp32 {s32:.1f} img/s, bf16 "
        f"{s16:.1f} img/s (bf16 / fp32 = {s16 / s32:.2f}x).",
    ]
    if curves:
        lines += _loss_lines(curves, args.loss_window)
    else:
        lines += ["", "Loss curves: not run (`--loss_steps 0`)."]
    return "\n".join(lines) + "\n"


def _load(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _loss_lines(curves: dict[str, list[float]], window: int) -> list[str]:
    means = {name: window_means(c, window) for name, c in curves.items()}
    a, b, other = means["fp32 seed 0"], means["bf16 seed 0"], means["fp32 seed 1"]
    rows = [
        "",
        f"Loss curves of the recipe on real MNIST, the same {len(curves['fp32 seed 0'])} steps (same batches; seed 0"
        " fixes the initialisation and every draw of t, noise and label dropout), mean training loss per "
        f"{window} steps; `fp32 seed 1` is another seed, the run-to-run noise the bf16 difference is read against:",
        "",
        "| steps | fp32 seed 0 | bf16 seed 0 | fp32 seed 1 | bf16 - fp32 | seed 1 - seed 0 |",
        "|---|---|---|---|---|---|",
    ]
    for i, (x, y, z) in enumerate(zip(a, b, other)):
        rows.append(
            f"| {i * window + 1}-{(i + 1) * window} | {x:.4f} | {y:.4f} | {z:.4f} | {y - x:+.4f} | {z - x:+.4f} |"
        )
    late = slice(len(a) // 2, None)  # after the first half, when the curves have settled
    bf16_gap = max(abs(y - x) for x, y in zip(a[late], b[late]))
    seed_gap = max(abs(z - x) for x, z in zip(a[late], other[late]))
    verdict = "within" if bf16_gap <= seed_gap else "outside"
    rows += [
        "",
        f"Second half: largest |bf16 - fp32| {bf16_gap:.4f} vs largest |seed 1 - seed 0| {seed_gap:.4f}: {verdict} the"
        " run-to-run noise.",
    ]
    return rows


if __name__ == "__main__":
    sys.exit(main())

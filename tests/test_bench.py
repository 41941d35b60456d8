"""The benchmark harness: FLOP counts against closed forms, a missing peer skipped with a note, and one tiny run
through ``main`` that prints the tables. Nothing here is timed: the figures themselves are not asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is a top-level folder, not part of the installed package

from benchmarks import bench, measure  # noqa: E402
from benchmarks.impls import build_impls, load_shape  # noqa: E402


def test_conv_net_flops_closed_form():
    # conv3x3 3->8 then 8->4 on 8x8, padding 1: forward 2 * C_out * H * W * C_in * 9 per image and conv;
    # backward: grad of the weights for both, grad of the input only for the second (the image needs none)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    conv1, conv2 = 2 * 8 * 64 * 3 * 9, 2 * 4 * 64 * 8 * 9
    x = torch.randn(5, 3, 8, 8)
    forward = lambda x, t: net(x)  # noqa: E731
    assert measure.flops_per_image(forward, net, x, train=False) == conv1 + conv2
    assert measure.flops_per_image(forward, net, x, train=True) == 2 * conv1 + 3 * conv2
    assert all(p.grad is None for p in net.parameters())  # counting leaves no gradients behind


def test_cpu_attention_flops_closed_form():
    # softmax(q k^T) v: two (L x d)(d x L)-sized matmuls, 4 B h L^2 d; the backward recomputes q k^T and does four
    # more, 10 B h L^2 d. torch's counter leaves the CPU flash kernel out; measure.py registers it.
    b, h, length, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
    forward = measure.count_flops(lambda: F.scaled_dot_product_attention(q, k, v), backward=False)
    train = measure.count_flops(lambda: F.scaled_dot_product_attention(q, k, v), backward=True)
    assert forward == 4 * b * h * length**2 * d
    assert train == 14 * b * h * length**2 * d


def test_shape_read_from_the_recipe():
    shape = load_shape("cifar10", REPO / "configs" / "cifar10.yaml")
    assert (shape.in_channels, shape.image_size) == (3, 32)  # from CIFAR10DataModule, as the CLI links them
    assert shape.model_args["base_channels"] == 128 and "optimizer" not in shape.model_args
    assert shape.ema_decay == 0.9999 and shape.grad_clip == 1.0


def test_missing_peer_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    shape = load_shape("tiny", REPO / "configs" / "mnist.yaml", bench.SHAPES["tiny"][1])
    impls, notes = build_impls(["diffusers"], shape, torch.device("cpu"), "fp32")
    assert impls == [] and len(notes) == 1 and "pip install -e .[bench]" in notes[0]
    with pytest.raises(ValueError, match="unknown implementation"):
        build_impls(["nope"], shape, torch.device("cpu"), "fp32")


def test_tiny_run_prints_the_tables(capsys, tmp_path):
    out = tmp_path / "BENCH.md"
    argv = ["--shapes", "tiny", "--impls", "ours", "--device", "cpu", "--threads", "1", "--rounds", "1"]
    argv += ["--train-steps", "1", "--sample-steps", "2", "--output", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| shape | implementation | params |" in printed and "| tiny | ours | 0.04M |" in printed
    report = out.read_text()
    assert report.startswith("# Benchmarks") and "--shapes tiny" in report and "| tiny | ours |" in report


def test_optimizer_switches_go_to_ours_only(tmp_path):
    # the recipe's fused/foreach choose how ours computes the update; the peers keep their examples' defaults
    recipe = yaml.safe_load((REPO / "configs" / "mnist.yaml").read_text())
    recipe["model"]["optimizer"]["init_args"] |= {"lr": 2e-4, "fused": True}
    config = tmp_path / "fused.yaml"
    config.write_text(yaml.safe_dump(recipe))
    shape = load_shape("tiny", config, bench.SHAPES["tiny"][1])
    assert shape.optimizer_switches == {"fused": True}
    assert "fused" not in shape.optimizer.keywords and shape.optimizer.keywords["lr"] == 2e-4
    (ours,), _ = build_impls(["ours"], shape, torch.device("cpu"), "fp32")
    optimizer = ours.module.optimizer_factory(ours.module.parameters())
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True


def test_tiny_ablation_prints_every_variant(tmp_path, shared_data):
    from benchmarks import ablate

    out = tmp_path / "ABL.md"
    argv = ["--shapes", "tiny", "--device", "cpu", "--threads", "1", "--rounds", "2", "--train-steps", "1"]
    argv += ["--sample-steps", "2", "--data_root", str(shared_data), "--output", str(out)]
    assert ablate.main(argv) == 0
    report = out.read_text()
    assert report.startswith("# Speed switches, before and after") and "--rounds 2" in report
    rows = ["| channels_last | NCHW |", "|  | channels_last |", "| optimizer | per-parameter loop |", "|  | fused |"]
    assert all(row in report for row in rows)
    assert "| compile |" not in report  # only with --compile: minutes of compiling
    assert "EMA update over all weights" in report and "sampling by batch size" in report
    assert "Optimizer update alone (its `step()` over all weights): per-parameter loop" in report
    assert "real-MNIST training loader" in report and "% of a training step" in report
    # one timed step per round: the median over the steps is the median of the two rounds it prints
    line = next(x for x in report.splitlines() if x.startswith("|  | fused |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    rounds = [float(v) for v in cells[-1].split(", ")]
    assert float(cells[2]) == pytest.approx(sum(rounds) / 2, rel=0.01)


def test_fast_sampling_benchmark_times_every_row_and_writes_the_table(tmp_path, capsys):
    """The equal-quality timing script on the tiny shape: ours fast, ours DDIM-50 and diffusers' pipeline."""
    pytest.importorskip("diffusers")
    from benchmarks import fast_sampling

    out = tmp_path / "FAST.md"
    argv = ["--shape", "tiny", "--batch", "1", "--rounds", "1", "--impls", "ours", "diffusers", "--output", str(out)]
    assert fast_sampling.main(argv) == 0
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ours") or line.startswith("| diffusers")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "ours, dpmpp_2m10",
        "ours, ddim50",
        "diffusers, DDIM-50 pipeline",
    ]
    assert [int(r.split("|")[2]) for r in rows] == [10, 50, 50] and rows[0].endswith("| 1.0x |")


@pytest.mark.parametrize(
    ("flags", "vendor", "fp32_lanes", "bf16_lanes"),
    [
        ({"avx", "avx2", "fma"}, "AuthenticAMD", 16, 16),  # Zen 3: 2 x 256-bit FMA pipes, no bf16 arithmetic
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, "AuthenticAMD", 16, 32),  # Zen 4: 512-bit ops on 256-bit pipes
        ({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}, "GenuineIntel", 32, 1024),  # Sapphire Rapids: AMX
    ],
)
def test_cpu_fma_peak_is_cores_clock_lanes_and_two(monkeypatch, flags, vendor, fp32_lanes, bf16_lanes):
    from benchmarks import measure

    monkeypatch.setattr(measure, "cpu_flags", lambda: flags)
    monkeypatch.setattr(measure, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(measure, "cpu_clock_hz", lambda: (2.5e9, "test"))
    peak = measure.cpu_fma_peak(threads=4)
    assert (peak["fp32_fma_lanes"], peak["bf16_fma_lanes"]) == (fp32_lanes, bf16_lanes)
    assert peak["fp32"] == 4 * 2.5e9 * fp32_lanes * 2
    assert peak["bf16"] == 4 * 2.5e9 * bf16_lanes * 2

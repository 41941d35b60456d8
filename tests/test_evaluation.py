"""`ddpm test` (FID/KID/IS + conditional accuracy, JSON, cached references), `ddpm sample`, `ddpm sweep`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MODEL_ARGS

from ddpm_lightning.cli import build_cli
from ddpm_lightning.main import main

CONFIG = REPO / "configs" / "mnist_conditional.yaml"


def _data_args(root) -> list[str]:
    return [f"--data.root={root}", "--data.download=false"]


@pytest.fixture(scope="module")
def tiny_checkpoint(shared_data, tmp_path_factory):
    """A conditional MNIST DDPM trained for a few steps through the real CLI (tiny U-Net, T=100)."""
    run = tmp_path_factory.mktemp("run")
    args = ["fit", f"--config={CONFIG}", *_data_args(shared_data), *TINY_MODEL_ARGS, "--model.num_timesteps=100"]
    args += [f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}"]
    args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]
    build_cli(args)
    ckpt = run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def _test_args(shared_data, ckpt, cache, extra=()) -> list[str]:
    args = ["test", f"--config={CONFIG}", f"--ckpt_path={ckpt}", *_data_args(shared_data), *TINY_MODEL_ARGS]
    args += ["--model.num_timesteps=100", "--trainer.limit_test_batches=1", "--trainer.logger=false"]
    args += ["--metrics.num_samples=40", "--metrics.sampling.sampler=ddim", "--metrics.sampling.num_steps=5"]
    args += ["--metrics.batch_size=16"]
    args += ["--metrics.reference_num=200", f"--metrics.cache_dir={cache}", *extra]
    return args


def test_ddpm_test_writes_json_and_reuses_reference_stats(
    tiny_checkpoint, shared_data, tmp_path, lightning_caplog, monkeypatch
):
    caplog = lightning_caplog
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"

    main(_test_args(shared_data, tiny_checkpoint, cache))
    files = sorted(tiny_checkpoint.parent.glob("last.metrics.ddim5-w3-gi1-10-n40-seed0.json"))
    assert len(files) == 1
    first = json.loads(files[0].read_text())
    res = first["results"]
    assert {"fid_classifier", "kid_classifier", "is_classifier", "cond_acc", "sample_seconds_per_1k"} <= set(res)
    assert res["fid_classifier"] > 0 and 0 <= res["cond_acc"] <= 1
    assert 0 <= res["precision_classifier"] <= 1 and 0 <= res["recall_classifier"] <= 1  # k = 3, the FID features
    s = first["settings"]
    assert (s["num_samples"], s["sampler"], s["num_steps"], s["seed"], s["reference_split"]) == (
        40,
        "ddim",
        5,
        0,
        "test",
    )
    assert s["guidance_interval"] == [1.0, 10.0]  # the recipe guides only at noise levels in (1, 10]
    assert first["extractors"]["classifier"].startswith("classifier-mnist-")
    assert "reference statistics computed" in caplog.text and len(list(cache.glob("*.pt"))) == 1

    caplog.clear()
    main(_test_args(shared_data, tiny_checkpoint, cache))
    assert "reference statistics reused" in caplog.text
    second = json.loads(files[0].read_text())["results"]
    assert second["fid_classifier"] == res["fid_classifier"]  # same seed, same samples, same number
    assert second["cond_acc"] == res["cond_acc"]

    caplog.clear()
    nll = ["--metrics.nll=true", "--metrics.nll_num_images=3"]  # the variational bound of 3 test digits
    main(_test_args(shared_data, tiny_checkpoint, cache, ["--metrics.seed=1", "--metrics.background=true", *nll]))
    other = json.loads(next(tiny_checkpoint.parent.glob("last.metrics.ddim5-w3-gi1-10-n40-seed1.json")).read_text())
    assert other["results"]["fid_classifier"] != res["fid_classifier"]
    # a few steps of training leave grey where real digits are black (real test digits: ~0.0001)
    assert 0.01 < other["results"]["background_noise"] <= 1 and other["settings"]["background"] is True
    assert "background_noise" not in res
    assert other["results"]["nll_num_images"] == 3 and other["settings"]["nll_variance"] == "fixed_large"
    bpd, stderr = other["results"]["nll_bpd"], other["results"]["nll_bpd_stderr"]
    assert 0.5 < bpd < 1e4 and 0 < stderr < bpd and "nll_bpd" not in res  # 3 training steps: far above MNIST's ~1
    assert f"test NLL: {bpd:.4f} ± {stderr:.4f} bits/dim" in caplog.text


@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_fid(tiny_checkpoint, shared_data, tmp_path):
    """Each of 2 gloo ranks samples half of N; the gathered features give the 1-process numbers."""
    results = {}
    for devices in (1, 2):
        cache = tmp_path / f"cache{devices}"
        extra = ["--trainer.accelerator=cpu", f"--trainer.devices={devices}"]
        extra += ["--trainer.strategy=ddp"] if devices == 2 else []
        cmd = [sys.executable, "-m", "ddpm_lightning.cli", *_test_args(shared_data, tiny_checkpoint, cache, extra)]
        cmd += ["--metrics.seed=7", "--metrics.nll=true", "--metrics.nll_num_images=3"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        errors = [line for line in proc.stderr.splitlines() if "Error" in line]  # every rank's, not the last one's
        assert proc.returncode == 0, "\n".join(errors)[-2000:] + "\n" + proc.stderr[-2000:]
        path = next(tiny_checkpoint.parent.glob("last.metrics.ddim5-w3-gi1-10-n40-seed7.json"))
        results[devices] = json.loads(path.read_text())
        path.unlink()
    assert results[2]["world_size"] == 2
    one, two = results[1]["results"], results[2]["results"]
    assert two["fid_classifier"] == pytest.approx(one["fid_classifier"], rel=1e-4)
    assert two["cond_acc"] == one["cond_acc"]
    for key in ("precision_classifier", "recall_classifier"):  # the gathered features, in index order
        assert two[key] == one[key]
    assert two["nll_bpd"] == pytest.approx(one["nll_bpd"], rel=1e-6)  # image i scored with its own noise on any rank


def test_fid_real_vs_real_is_small_and_real_vs_noise_large(shared_data, tmp_path):
    from ddpm_lightning.data import MNISTDataModule
    from ddpm_lightning.metrics.evaluate import extract, reference_stats
    from ddpm_lightning.metrics.extractors import ClassifierExtractor
    from ddpm_lightning.metrics.stats import FeatureStats, fid

    dm = MNISTDataModule(root=str(shared_data), download=False)
    ex = ClassifierExtractor("mnist")
    ref, _, _ = reference_stats(dm, "test", 2000, ex, tmp_path)
    other_real = FeatureStats.from_features(extract(ex, dm.real_images("train", 2000, seed=1)[0])[0])
    noise = torch.randint(0, 256, (2000, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise_stats = FeatureStats.from_features(extract(ex, noise)[0])
    real_real, real_noise = fid(other_real, ref), fid(noise_stats, ref)
    assert real_real < 0.02 * real_noise, (real_real, real_noise)


def test_sample_command_writes_grid_pngs_npz_and_trajectory(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s"
    main(["sample", f"--ckpt_path={tiny_checkpoint}", "--num_samples=6", "--labels", "7", "3"])
    # default out_dir is ./samples; run again into a chosen folder with the same seed: identical images
    main(["sample", f"--ckpt_path={tiny_checkpoint}", "--num_samples=6", "--labels", "7", "3", f"--out_dir={out}"])
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (6, 28, 28, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [7, 3, 7, 3, 7, 3]
    assert json.loads(str(data["settings"]))["seed"] == 0
    assert (out / "grid.png").is_file() and (out / "trajectory.png").is_file()
    assert len(list((out / "png").glob("*.png"))) == 6
    assert np.array_equal(np.load("samples/samples.npz")["images"], data["images"])


def test_sample_command_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", f"--ckpt_path={tmp_path / 'missing.ckpt'}"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        main(["sample", f"--ckpt_path={bad}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("ddpm: error:") and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--guidance_scale=-1"], "guidance_scale must be >= 0"),
        (["--sampler=plms"], "unknown sampler 'plms'; choose one of: ddpm, ddim, dpmpp_2m"),
        (["--sampler=ddim", "--spacing=karras"], "spacing applies to the solvers"),
        (["--sampler=dpmpp_2m", "--num_steps=100"], "num_steps must be an integer in [1, 99]"),
    ],
)
def test_sample_command_refuses_bad_sampling_in_one_line(tiny_checkpoint, tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as e:
        main(["sample", f"--ckpt_path={tiny_checkpoint}", "--num_samples=2", f"--out_dir={tmp_path}", *flags])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, one line
    assert e.value.code == 2 and last.startswith("ddpm: error:") and needle in last, last


def test_sample_command_with_a_fast_solver(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "fast"
    main(["sample", f"--ckpt_path={tiny_checkpoint}", "--num_samples=4", f"--out_dir={out}"]
         + ["--sampler=dpmpp_2m", "--num_steps=10", "--guidance_scale=3", "--trajectory_images=2"])  # fmt: skip
    assert "20 NFE/sample" in capsys.readouterr().out  # 10 guided steps: conditional and unconditional halves
    settings = json.loads(str(np.load(out / "samples.npz")["settings"]))["sampling"]
    assert settings["sampler"] == "dpmpp_2m" and settings["num_steps"] == 10
    assert len(list((out / "png").glob("*.png"))) == 4 and (out / "trajectory.png").is_file()


def test_sweep_by_nfe_plots_quality_accuracy_and_time(tiny_checkpoint, shared_data, tmp_path, monkeypatch):
    """... with one Evaluator for all rows: each feature network is built (loaded) once, not once per row."""
    from ddpm_lightning.metrics import evaluator

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "nfe"
    built, build = [], evaluator.build_extractor

    def counting_build(kind, *args):
        built.append(kind)
        return build(kind, *args)

    monkeypatch.setattr(evaluator, "build_extractor", counting_build)
    main(
        ["sweep", f"--config={CONFIG}", f"--ckpt_path={tiny_checkpoint}", f"--data_root={shared_data}"]
        + ["--samplers", "ddim", "dpmpp_2m", "heun", "--nfe", "6", "10", "--guidance_scale=3", "--num_samples=20"]
        + [f"--out_dir={out}"]
    )
    result = json.loads((out / "sweep.json").read_text())
    rows = result["rows"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddim", 3, 6),
        ("ddim", 5, 10),
        ("dpmpp_2m", 3, 6),
        ("dpmpp_2m", 5, 10),
        ("heun", 2, 6),
        ("heun", 3, 10),
    ]  # guided: two evaluations per step; heun: two per step but the last
    assert all(0 <= r["cond_acc"] <= 1 and r["fid_classifier"] > result["floor"]["fid_classifier"] for r in rows)
    assert (out / "sweep.png").stat().st_size > 10_000
    assert built == ["classifier"]  # six rows and the real-data floor


def test_test_without_a_checkpoint_is_refused_unless_asked(shared_data, capsys):
    args = ["test", f"--config={CONFIG}", *_data_args(shared_data), *TINY_MODEL_ARGS, "--trainer.logger=false"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs --ckpt_path" in err and "--untrained true" in err


def test_sweep_command_table_json_and_plot(tiny_checkpoint, shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "sweep"
    main(
        ["sweep", f"--config={CONFIG}", f"--ckpt_path={tiny_checkpoint}", f"--data_root={shared_data}"]
        + ["--steps", "2", "4", "100", "--samplers", "ddim", "ddpm", "--num_samples=20", f"--out_dir={out}"]
    )
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        ("ddim", 2),
        ("ddim", 4),
        ("ddim", 100),
        ("ddpm", 2),
        ("ddpm", 4),
        ("ddpm", 100),
    ]
    assert all(r["fid_classifier"] > 0 for r in rows) and (out / "sweep.png").stat().st_size > 10_000
    floor = json.loads((out / "sweep.json").read_text())["floor"]
    assert all(0 <= r["precision_classifier"] <= 1 and 0 <= r["recall_classifier"] <= 1 for r in [*rows, floor])
    # more steps cost more time per sample
    assert rows[2]["sample_seconds_per_1k"] > rows[0]["sample_seconds_per_1k"]
    printed = capsys.readouterr().out
    assert "ddpm   100 steps" in printed and "precision_classifier=" in printed and "recall_classifier=" in printed


@pytest.mark.slow
def test_inception_fid_offline_with_prepared_weights(shared_data, tmp_path):
    """torch-fidelity's Inception-v3 from the weights ../shared/tools/inception_weights.py prepares (no hub access)."""
    from ddpm_lightning.data import MNISTDataModule
    from ddpm_lightning.metrics.evaluate import extract
    from ddpm_lightning.metrics.extractors import INCEPTION_FILE, InceptionExtractor
    from ddpm_lightning.metrics.stats import FeatureStats, fid

    tool = shared_data.parent / "tools" / "inception_weights.py"
    proc = subprocess.run([sys.executable, str(tool), "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ex = InceptionExtractor(tmp_path / INCEPTION_FILE)
    dm = MNISTDataModule(root=str(shared_data), download=False)
    a, b = dm.real_images("test", 12, seed=0)[0], dm.real_images("train", 12, seed=1)[0]
    noise = torch.randint(0, 256, (12, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fa, logits = extract(ex, a, batch_size=12)
    assert fa.shape == (12, 2048) and logits.shape == (12, 1008)
    sa, sb, sn = (FeatureStats.from_features(f) for f in (fa, extract(ex, b)[0], extract(ex, noise)[0]))
    assert fid(sa, sb) < 0.5 * fid(sa, sn)
    assert ex.name.startswith("inception-v3-compat-")

"""The experiments runner on a tiny budget and real MNIST: it trains through ``ddpm fit``, checkpoints, evaluates,
writes the report, skips work already done, resumes an interrupted run, and rebuilds the report without checkpoints.
The shipped study files are validated too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/ is a top-level folder, not part of the installed package

from experiments import run  # noqa: E402
from experiments import study as study_files  # noqa: E402

TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": -1,
        "log_every_n_steps": 1,
        "val_check_interval": 2,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "."}},
        "callbacks": [{"class_path": "ddpm_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}],
    },
    "model": {
        "conditional": True,
        "cond_drop_prob": 0.1,
        "base_channels": 8,
        "channel_mults": [1],
        "num_res_blocks": 1,
        "num_groups": 4,
        "num_timesteps": 20,
        "val_timesteps": 2,
    },
    "data": {
        "class_path": "ddpm_lightning.data.MNISTDataModule",
        "init_args": {"root": "data", "download": True, "batch_size": 8, "val_size": 100},
    },
}


def _study(tmp_path: Path, **changes) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY_CONFIG))
    study = {
        "title": "Tiny study",
        "question": "Does the runner run?",
        "base": str(cfg),
        "budget": {"max_steps": 4},
        "checkpoint_every": 2,
        "seeds": [0],
        "variants": {"linear": {}, "cosine": {"model.schedule": "cosine"}},
        "evaluations": {
            "curve": {"checkpoints": "all", "num_samples": 20, "num_steps": 2, "batch_size": 20},
            "raw": {"weights": "raw", "num_samples": 20, "num_steps": 2, "guidance_scale": 2.0},
        },
        "discussion": "Hand-written reading.",
        **changes,
    }
    path = tmp_path / "tiny_study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _main(study: Path, tmp_path: Path, shared: Path, *extra: str) -> int:
    return run.main(
        [str(study), "--runs_dir", str(tmp_path / "runs"), "--report", str(tmp_path / "out" / "REPORT.md")]
        + ["--data_root", str(shared), "--threads", "1", *extra]
    )


@pytest.mark.slow
def test_runner_trains_evaluates_reports_and_skips_done_work(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    study_path = _study(tmp_path)
    assert _main(study_path, tmp_path, shared_data) == 0

    study = study_files.load_study(study_path)
    specs = study_files.run_specs(study)
    assert len({s["id"] for s in specs}) == 2  # the two variants are two runs
    for spec in specs:
        run_dir = tmp_path / "runs" / spec["id"]
        record = json.loads((run_dir / "train.json").read_text())
        assert record["global_step"] == 4 and record["attempts"] == 1
        assert [step for step, _ in record["checkpoints"]] == [2, 4]
        for step in (2, 4):
            res = json.loads(study_files.result_path(run_dir, step, study["evaluations"]["curve"]).read_text())
            assert res["step"] == step and 0.0 <= res["cond_acc"] <= 1.0 and res["fid_classifier"] > 0
        raw = json.loads(study_files.result_path(run_dir, 4, study["evaluations"]["raw"]).read_text())
        ema = json.loads(study_files.result_path(run_dir, 4, study["evaluations"]["curve"]).read_text())
        assert raw["fid_classifier"] != ema["fid_classifier"]  # raw weights differ from the EMA after 4 steps

    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "## Tiny study" in report and "Hand-written reading." in report
    assert "| linear | curve | 4 |" in report and "| cosine | raw | 4 |" in report
    assert "*Real-vs-real floor*" in report and "N=20" in report
    for png in ("tiny_study-curves.png", "tiny_study-val-loss.png", "tiny_study-linear-grid.png"):
        assert (tmp_path / "out" / "figures" / png).stat().st_size > 1000, png
        assert f"figures/{png}" in report

    # a second call does no work: no new fit attempt, no evaluation rewritten
    run_dir = tmp_path / "runs" / specs[0]["id"]
    results = sorted((run_dir / "eval").glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in results]
    assert _main(study_path, tmp_path, shared_data) == 0
    assert (run_dir / "attempts.jsonl").read_text().count("\n") == 1
    assert [p.stat().st_mtime_ns for p in results] == mtimes

    # an interrupted run (no train.json) resumes from its last.ckpt instead of starting over
    (run_dir / "train.json").unlink()
    assert "--ckpt_path" in run.fit_command(specs[0]["train"], run_dir, None)
    assert _main(study_path, tmp_path, shared_data, "--train_only") == 0
    record = json.loads((run_dir / "train.json").read_text())
    assert record["attempts"] == 2 and record["global_step"] == 4
    assert "Restoring states from the checkpoint" in (run_dir / "fit.log").read_text()

    # the report rebuilds from the saved results alone, without checkpoints and without sampling
    assert _main(study_path, tmp_path, shared_data, "--report_only") == 0
    report = (tmp_path / "out" / "REPORT.md").read_text()
    for ckpt in (tmp_path / "runs").rglob("*.ckpt"):
        ckpt.unlink()
    (tmp_path / "out" / "REPORT.md").unlink()
    assert _main(study_path, tmp_path, shared_data, "--report_only") == 0
    assert (tmp_path / "out" / "REPORT.md").read_text() == report

    # a recipe's comments and its sampling-only sections are not its training: the finished run is still reused
    sampling = {"guidance_scale": 3.0, "guidance_interval": [1.0, 10.0]}
    edited = {**TINY_CONFIG, "model": {**TINY_CONFIG["model"], "sampling": sampling}, "metrics": {"num_samples": 10}}
    (tmp_path / "tiny.yaml").write_text("# edited\n" + yaml.safe_dump(edited))
    assert _main(study_path, tmp_path, shared_data, "--train_only") == 0
    assert (run_dir / "attempts.jsonl").read_text().count("\n") == 2  # no new fit attempt
    # ... but not once what it says about training has changed
    edited["model"]["base_channels"] = 16
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(edited))
    assert _main(study_path, tmp_path, shared_data, "--train_only") == 2
    assert "changed since it was trained" in capsys.readouterr().err


def test_runs_recorded_with_the_file_digest_are_checked_by_it_and_upgraded(tmp_path):
    """Records written before the training-sections digest carry the config file's byte digest: still honoured."""
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("# a recipe\n" + yaml.safe_dump(TINY_CONFIG))
    train = {"base": [str(cfg)]}
    legacy = {"config_sha256": study_files.config_file_digests(train)}
    assert run.config_unchanged(legacy, train) and run.config_unchanged({}, train)
    assert not run.config_unchanged({"config_sha256": {str(cfg): "0" * 12}}, train)
    current = {"training_config_sha256": study_files.config_digests(train)}
    cfg.write_text(yaml.safe_dump({**TINY_CONFIG, "metrics": {"seed": 3}}))  # bytes changed, training not
    assert run.config_unchanged(current, train) and not run.config_unchanged(legacy, train)

    spec = {"id": "recipe-0", "train": train}
    (tmp_path / "recipe-0").mkdir()
    done = tmp_path / "recipe-0" / "train.json"
    done.write_text(json.dumps({"global_step": 4}))
    record = run.train_run(spec, tmp_path, None, 1)  # no digest at all: reused, and given the current one
    assert record["training_config_sha256"] == current["training_config_sha256"]
    assert json.loads(done.read_text())["training_config_sha256"] == current["training_config_sha256"]


@pytest.mark.slow
def test_post_hoc_ema_evaluations_score_the_reconstruction_ddpm_phema_writes(tmp_path, shared_data, monkeypatch):
    """A run trained with the PostHocEMA callback (added by the variant's overrides) is scored at several sigma_rel:
    each evaluation scores exactly the weights `ddpm phema --sigma_rel S --out` writes from the run's snapshots."""
    import torch

    from ddpm_lightning.main import main as ddpm_main
    from experiments import evaluation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    phema = {
        "trainer.callbacks+": "ddpm_lightning.callbacks.PostHocEMA",
        "trainer.callbacks.every_n_steps": 2,
        "trainer.callbacks.dirpath": "ckpts/phema",
    }
    sweep = {
        f"phema{s}": {"weights": "phema", "sigma_rel": s, "num_samples": 20, "num_steps": 2, "batch_size": 20}
        for s in (0.05, 0.2)
    }
    sweep["phema0.05"]["variants"] = sweep["phema0.2"]["variants"] = ["phema"]  # not for the run without snapshots
    variants = {"phema": phema, "plain": {"model.schedule": "cosine"}}
    study_path = _study(tmp_path, budget={"max_steps": 6}, variants=variants, evaluations=sweep)
    assert _main(study_path, tmp_path, shared_data) == 0

    study = study_files.load_study(study_path)
    spec, plain = study_files.run_specs(study)
    assert not (tmp_path / "runs" / plain["id"] / "eval").exists()  # its evaluations name only the other variant
    run_dir = tmp_path / "runs" / spec["id"]
    assert sorted(p.name for p in (run_dir / "ckpts" / "phema").glob("*.pt")) == [
        f"phema-{s:07d}.pt" for s in (2, 4, 6)
    ]
    fids = {}
    for name, ev in study["evaluations"].items():
        res = json.loads(study_files.result_path(run_dir, 6, ev).read_text())
        assert res["step"] == 6 and res["settings"]["sigma_rel"] == ev["sigma_rel"]
        fids[name] = res["fid_classifier"]
        out = tmp_path / f"{name}.ckpt"
        argv = ["phema", "--ckpt_dir", str(run_dir / "ckpts"), "--sigma_rel", str(ev["sigma_rel"]), "--out", str(out)]
        assert ddpm_main(argv) in (0, None)
        written = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
        loaded = evaluation.load_weights(run_dir / "ckpts" / "last.ckpt", "phema", ev["sigma_rel"], 6).state_dict()
        assert set(written) == set(loaded)
        for key, value in written.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert fids["phema0.05"] != fids["phema0.2"]  # two EMA lengths, two different models


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"budjet": {"max_steps": 1}}, "unknown key(s) ['budjet']"),
        ({"budget": {"max_epochs": 1}}, "budget must set one or both of: max_steps, max_time"),
        ({"base": "configs/nope.yaml"}, "base config 'configs/nope.yaml' does not exist"),
        ({"evaluations": {"e": {"weights": "swa"}}}, "unknown weights 'swa'; choose one of: ema, raw, phema"),
        ({"evaluations": {"e": {"weights": "phema"}}}, "'e': sigma_rel goes with weights: phema, and only with it"),
        ({"evaluations": {"e": {"sigma_rel": 0.1}}}, "'e': sigma_rel goes with weights: phema, and only with it"),
        ({"evaluations": {"e": {"weights": "phema", "sigma_rel": 0.5}}}, "'e': sigma_rel must be"),
        ({"evaluations": {"e": {"variants": ["cosin"]}}}, "evaluation 'e': unknown variant(s) ['cosin']"),
        ({"evaluations": {"e": {"checkpoints": "best"}}}, "unknown checkpoints 'best'; choose one of: all, last"),
        ({"evaluations": {"e": {"sampler": "bogus"}}}, "'e': unknown sampler 'bogus'; choose one of: ddpm, ddim"),
        ({"variants": {"a": {"budget": {"max_epochs": 2}}}}, "variant 'a': budget may set only: max_steps, max_time"),
        ({"budget_minutes": 0}, "budget_minutes must be a number > 0, got 0"),
        ({"variants": {"a": {"base": "configs/nope.yaml"}}}, "variant 'a': base config 'configs/nope.yaml' does not"),
        ({"variants": {"a": {"budget_minutes": "x"}}}, "variant 'a': budget_minutes must be a number > 0, got 'x'"),
    ],
)
def test_bad_study_is_one_line_error(tmp_path, capsys, changes, message):
    path = _study(tmp_path, **changes)
    argv = [str(path), "--runs_dir", str(tmp_path / "runs"), "--report", str(tmp_path / "R.md"), "--report_only"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("experiments: error:") and message in err and "\n" not in err


def test_unknown_study_name_lists_the_studies(capsys):
    assert run.main(["nope", "--report_only", "--report", "/nonexistent/R.md"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'nope'; choose from:" in err and "schedules" in err and "quality_bar" in err


def test_shipped_studies_are_valid_and_share_the_baseline_run():
    studies = {s["name"]: s for s in study_files.find_studies([])}
    assert {"schedules", "schedules_fashion", "timesteps", "conditional", "guidance", "ema", "sampling"} <= set(studies)
    assert "quality_bar" in studies
    ids = {
        name: {(s["variant"], s["seed"]): s["id"] for s in study_files.run_specs(st)} for name, st in studies.items()
    }
    baseline = ids["schedules"][("linear", 0)]
    # the studies that read the conditional linear T=1000 model train it once
    assert ids["timesteps"][("T=1000", 0)] == baseline
    assert ids["conditional"][("conditional", 0)] == baseline
    assert ids["guidance"][("baseline", 0)] == baseline
    assert ids["ema"][("baseline", 0)] == baseline
    assert ids["sampling"][("baseline", 0)] == baseline
    assert ids["schedules"][("linear", 1)] != baseline
    # the quality bar of the shipped recipe is the new recipe's seed-42 run of the 15-vs-30 comparison
    assert ids["quality_bar"][("recipe", 42)] == ids["recipe_15_vs_30"][("new_15min", 42)]


def test_a_variant_budget_replaces_the_study_budget_and_sets_its_minutes_per_step(tmp_path):
    """time_to_quality-style budgets: steps at each variant's own speed for the same quiet-machine minutes."""
    path = _study(tmp_path, budget_minutes=10, variants={"a": {}, "b": {"x.y": 1, "budget": {"max_steps": 8}}})
    study = study_files.load_study(path)
    specs = {s["variant"]: s for s in study_files.run_specs(study)}
    assert specs["a"]["train"]["budget"] == {"max_steps": 4} and specs["b"]["train"]["budget"] == {"max_steps": 8}
    assert specs["b"]["train"]["overrides"] == {"x.y": 1}  # the budget is no CLI override
    assert study_files.minutes_per_step(study, "a") == 2.5 and study_files.minutes_per_step(study, "b") == 1.25
    assert "--trainer.max_steps 8" in " ".join(run.fit_command(specs["b"]["train"], tmp_path, None))
    # a variant with its own minutes (15 vs 30 minutes at one speed): not a CLI override either
    c = {"budget": {"max_steps": 2}, "budget_minutes": 5}
    path = _study(tmp_path, budget_minutes=10, variants={"a": {}, "c": c})
    study = study_files.load_study(path)
    assert study_files.minutes_per_step(study, "c") == 2.5 == study_files.minutes_per_step(study, "a")
    assert {s["variant"]: s["train"]["overrides"] for s in study_files.run_specs(study)}["c"] == {}
    # the shipped study: the recipe's 530 steps stand for 10 minutes
    shipped = study_files.load_study(REPO / "experiments" / "studies" / "time_to_quality.yaml")
    assert study_files.minutes_per_step(shipped, "recipe") == pytest.approx(10 / 530)


def test_post_hoc_snapshots_are_found_beside_the_checkpoint_or_the_recipes_own_checkpoints(tmp_path):
    from experiments.evaluation import snapshot_dir

    ckpt = tmp_path / "run" / "ckpts" / "last.ckpt"
    recipe_dir = tmp_path / "run" / "tb" / "version_0" / "checkpoints"
    (recipe_dir / "phema").mkdir(parents=True)
    assert snapshot_dir(ckpt) == recipe_dir  # configs/mnist_conditional.yaml's PostHocEMA, default folder
    (ckpt.parent / "phema").mkdir(parents=True)
    assert snapshot_dir(ckpt) == ckpt.parent  # a variant's dirpath: ckpts/phema comes first


def test_a_variant_base_trains_that_recipe_and_names_its_runs(tmp_path):
    """recipe_15_vs_30-style: a whole recipe (its own config file) against the study's base."""
    other = tmp_path / "other_recipe.yaml"
    other.write_text(yaml.safe_dump({**TINY_CONFIG, "seed_everything": 7}))
    path = _study(tmp_path, variants={"old": {}, "new": {"base": str(other), "budget": {"max_steps": 2}}})
    specs = {s["variant"]: s for s in study_files.run_specs(study_files.load_study(path))}
    assert specs["new"]["train"]["base"] == [str(other)] and specs["new"]["train"]["overrides"] == {}
    assert specs["new"]["id"].startswith("other_recipe-") and specs["old"]["id"].startswith("tiny-")
    new_cmd, old_cmd = (" ".join(run.fit_command(specs[v]["train"], tmp_path, None)) for v in ("new", "old"))
    assert f"--config {other} " in new_cmd and "tiny.yaml" not in new_cmd and "--base" not in new_cmd
    assert f"--config {tmp_path / 'tiny.yaml'} " in old_cmd and "other_recipe" not in old_cmd
    # the shipped comparison: the old recipe from its frozen copy, the new one from the file users run
    shipped = study_files.load_study(REPO / "experiments" / "studies" / "recipe_15_vs_30.yaml")
    bases = {s["variant"]: s["train"]["base"] for s in study_files.run_specs(shipped)}
    assert bases == {
        "old_30min": ["experiments/configs/mnist_conditional_dec2026.yaml"],
        "new_15min": ["configs/mnist_conditional.yaml"],
    }


def test_fit_command_passes_budget_seed_data_and_checkpointing(tmp_path):
    study = study_files.load_study(REPO / "experiments" / "studies" / "timesteps.yaml")
    spec = next(s for s in study_files.run_specs(study) if s["variant"] == "T=10" and s["seed"] == 1)
    cmd = run.fit_command(spec["train"], tmp_path, "/data")
    text = " ".join(cmd)
    assert "--model.num_timesteps 10" in text and "--seed_everything 1" in text
    assert "--trainer.max_steps 800 --trainer.max_epochs -1" in text
    assert "--data.root /data --data.download false" in text
    assert "--trainer.callbacks.every_n_train_steps 200" in text and "--ckpt_path" not in text


def test_variants_option_trains_only_the_named_variants(tmp_path, monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(run, "train_run", lambda spec, *a: trained.append(spec["variant"]) or {})
    path = _study(tmp_path)
    argv = [str(path), "--runs_dir", str(tmp_path / "runs"), "--report", str(tmp_path / "R.md"), "--train_only"]
    assert run.main(argv + ["--variants", "cosine"]) == 0
    assert trained == ["cosine"]
    assert run.main(argv + ["--variants", "cosine", "cosin"]) == 2
    assert "unknown variant(s) ['cosin']; the studies have: cosine, linear" in capsys.readouterr().err


def test_seeds_option_trains_only_the_named_seeds(tmp_path, monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(run, "train_run", lambda spec, *a: trained.append((spec["variant"], spec["seed"])) or {})
    path = _study(tmp_path, seeds=[1, 2])
    argv = [str(path), "--runs_dir", str(tmp_path / "runs"), "--report", str(tmp_path / "R.md"), "--train_only"]
    assert run.main(argv + ["--seeds", "2", "--variants", "linear"]) == 0
    assert trained == [("linear", 2)]
    assert run.main(argv + ["--seeds", "3"]) == 2
    assert "unknown seed(s) [3]; the studies have: 1, 2" in capsys.readouterr().err


def test_running_one_shipped_study_keeps_every_study_in_the_report(tmp_path):
    shipped = [s["name"] for s in study_files.find_studies([])]
    one = study_files.find_studies(["ema_length"])
    assert [s["name"] for s in run.report_studies(one)] == shipped  # the shared REPORT.md keeps all sections
    tiny = study_files.find_studies([str(_study(tmp_path))])
    assert [s["name"] for s in run.report_studies(tiny)] == ["tiny_study"]  # a study of one's own: its own report


def test_a_trained_run_whose_checkpoints_are_gone_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A fresh clone has the committed run records (``train.json``) without the git-ignored checkpoints: an
    evaluation still to do names the missing file and how to train again, instead of failing inside torch.load."""
    from experiments import evaluation

    path = _study(tmp_path)
    study = study_files.find_studies([str(path)])[0]
    spec = study_files.run_specs(study)[0]
    run_dir = tmp_path / "runs" / spec["id"]
    run_dir.mkdir(parents=True)
    (run_dir / "train.json").write_text(json.dumps({"checkpoints": [[2, "step=000002.ckpt"], [4, "last.ckpt"]]}))
    with pytest.raises(study_files.StudyError) as err:
        evaluation.evaluate_run(spec, study, tmp_path / "runs", None)
    assert str(err.value) == (
        f"run {spec['id']} ({spec['variant']}, seed 0) was trained, but evaluation 'curve' needs"
        f" ckpts/step=000002.ckpt and it is gone (checkpoints are not committed); delete {run_dir} to train the run"
        " again"
    )
    monkeypatch.setattr(evaluation, "real_floor", lambda *a: {})
    monkeypatch.setattr(run, "train_run", lambda spec, *a: {})
    argv = [str(path), "--runs_dir", str(tmp_path / "runs"), "--report", str(tmp_path / "R.md"), "--threads", "1"]
    argv += ["--variants", "linear"]
    assert run.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"experiments: error: {err.value}"]


def test_a_guidance_interval_sweep_is_drawn_as_fid_against_accuracy(tmp_path) -> None:
    """An interval is two numbers: the sweep's picture is the FID / accuracy frontier, seeds averaged, labelled."""
    from experiments import report

    def finals(fid: float, acc: float | None) -> dict:
        return {"fid_classifier": fid, **({"cond_acc": acc} if acc is not None else {})}

    study = {
        "title": "t",
        "sweep": "guidance_interval",
        "evaluations": {"plain": {}, "gi": {"guidance_interval": [1.0, 10.0]}, "uncond": {}},
    }
    results = {
        "plain": {"v": {42: [(795, finals(38.0, 0.998))], 43: [(795, finals(36.0, 0.996))]}},
        "gi": {"v": {42: [(795, finals(20.0, 0.99))]}},
        "uncond": {"u": {42: [(795, finals(100.0, None))]}},  # no accuracy (an unconditional model): left out
    }
    png = tmp_path / "frontier.png"
    points = report._plot_frontier(study, results, png)
    assert points == [("none", pytest.approx(99.7), 37.0), ("(1, 10]", pytest.approx(99.0), 20.0)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

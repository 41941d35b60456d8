"""The experiments runner: train every run of a study, evaluate its checkpoints, and write ``experiments/REPORT.md``.

    python -m experiments.run [STUDY ...] [--data_root ../shared/data] [--jobs 2] [--report_only]

A study is one YAML file in ``experiments/studies/`` (see ``experiments/README.md``): a base config, the overrides
common to its runs, the training budget, the seeds, the variants (config overrides each) and the evaluations (settings
of :class:`~ddpm_lightning.callbacks.SampleMetrics`, on every checkpoint or on the last one, with EMA or raw weights).

Every run trains with ``ddpm fit`` in a subprocess, in ``experiments/runs/<run id>/``, where the run id is a digest of
what decides the training (configs, overrides, budget, seed): studies that ask for the same training share the run.
Work already done is skipped: a finished run has ``train.json``; an interrupted one resumes from its ``last.ckpt``;
each evaluation result is a JSON file keyed by the checkpoint and the evaluation settings. The report is rebuilt from
the saved results alone (``--report_only`` never trains or samples).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
STUDIES_DIR = ROOT / "experiments" / "studies"
RUNS_DIR = ROOT / "experiments" / "runs"
REPORT = ROOT / "experiments" / "REPORT.md"
STUDY_KEYS = {"title", "question", "source", "base", "overrides", "budget", "checkpoint_every", "seeds", "variants"}
STUDY_KEYS |= {"evaluations", "discussion", "grid", "sweep"}
BUDGET_KEYS = ("max_steps", "max_time")
EVAL_KEYS = {"checkpoints", "weights"}
CHECKPOINT_CHOICES = ("all", "last")
WEIGHT_CHOICES = ("ema", "raw")


class StudyError(ValueError):
    """A study file that cannot be run (unknown key, bad choice, missing config): one line naming the file."""


# -- study files -------------------------------------------------------------------------------------------------
def load_study(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a study YAML; ``name`` is the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study {str(path)!r} does not exist")
    try:
        study = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StudyError(f"{path.name}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(study, dict):
        raise StudyError(f"{path.name}: a study is a mapping of keys ({', '.join(sorted(STUDY_KEYS))})")
    unknown = set(study) - STUDY_KEYS
    if unknown:
        raise StudyError(f"{path.name}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(STUDY_KEYS))}")
    for key in ("title", "base", "budget", "variants", "evaluations"):
        if key not in study:
            raise StudyError(f"{path.name}: missing key {key!r}")
    study["name"] = path.stem
    study["base"] = [study["base"]] if isinstance(study["base"], str) else list(study["base"])
    for cfg in study["base"]:
        if not (ROOT / cfg).is_file():
            raise StudyError(f"{path.name}: base config {cfg!r} does not exist")
    budget = study["budget"]
    if not isinstance(budget, dict) or not budget or set(budget) - set(BUDGET_KEYS):
        raise StudyError(f"{path.name}: budget must set one or both of: {', '.join(BUDGET_KEYS)}")
    study.setdefault("overrides", {})
    study.setdefault("seeds", [0])
    study.setdefault("checkpoint_every", None)
    study["variants"] = {str(k): dict(v or {}) for k, v in study["variants"].items()}
    evals = study["evaluations"]
    if not isinstance(evals, dict) or not evals:
        raise StudyError(f"{path.name}: evaluations must map names to settings")
    from ddpm_lightning.callbacks.metrics import SampleMetrics

    for name, ev in evals.items():
        ev = evals[name] = dict(ev or {})
        ev.setdefault("checkpoints", "last")
        ev.setdefault("weights", "ema")
        if ev["checkpoints"] not in CHECKPOINT_CHOICES:
            raise StudyError(
                f"{path.name}: evaluation {name!r}: unknown checkpoints {ev['checkpoints']!r}; choose one of: "
                + ", ".join(CHECKPOINT_CHOICES)
            )
        if ev["weights"] not in WEIGHT_CHOICES:
            raise StudyError(
                f"{path.name}: evaluation {name!r}: unknown weights {ev['weights']!r}; choose one of: "
                + ", ".join(WEIGHT_CHOICES)
            )
        try:
            SampleMetrics(**metric_settings(ev))
        except (TypeError, ValueError) as err:
            raise StudyError(f"{path.name}: evaluation {name!r}: {err}") from None
    return study


def metric_settings(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k not in EVAL_KEYS}


def find_studies(names: Sequence[str]) -> list[dict[str, Any]]:
    """Studies by name (a file of ``experiments/studies``) or by path to a YAML file; all of them when none given."""
    known = {f.stem: f for f in sorted(STUDIES_DIR.glob("*.yaml"))}
    paths = []
    for n in names or list(known):
        if n in known:
            paths.append(known[n])
        elif n.endswith((".yaml", ".yml")) and Path(n).is_file():
            paths.append(Path(n))
        else:
            raise StudyError(f"unknown study {n!r}; choose from: {', '.join(known)} (or give a path to a YAML file)")
    return [load_study(p) for p in paths]


# -- runs --------------------------------------------------------------------------------------------------------
def _digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def run_specs(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One training spec per (variant, seed); its ``id`` is a digest of everything that decides the training."""
    specs = []
    for variant, overrides in study["variants"].items():
        for seed in study["seeds"]:
            train = {
                "base": study["base"],
                "overrides": {**study["overrides"], **overrides},
                "budget": study["budget"],
                "checkpoint_every": study["checkpoint_every"],
                "seed": seed,
            }
            stem = Path(study["base"][0]).stem
            specs.append({"variant": variant, "seed": seed, "train": train, "id": f"{stem}-{_digest(train)}"})
    return specs


def config_digests(train: dict[str, Any]) -> dict[str, str]:
    """SHA-256 (12 hex digits) of each base config file: a finished run is reused only while they are unchanged."""
    return {cfg: hashlib.sha256((ROOT / cfg).read_bytes()).hexdigest()[:12] for cfg in train["base"]}


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def fit_command(train: dict[str, Any], run_dir: Path, data_root: str | None) -> list[str]:
    """The ``ddpm fit`` command line of a run (resuming from ``last.ckpt`` when one exists)."""
    cmd = [sys.executable, "-m", "ddpm_lightning.cli", "fit"]
    for cfg in train["base"]:
        cmd += ["--config", str(ROOT / cfg)]
    for key, value in train["overrides"].items():
        cmd += [f"--{key}", _cli_value(value)]
    cmd += ["--seed_everything", str(train["seed"])]
    if data_root is not None:
        cmd += ["--data.root", data_root, "--data.download", "false"]
    budget = train["budget"]
    if "max_steps" in budget:
        cmd += ["--trainer.max_steps", str(budget["max_steps"]), "--trainer.max_epochs", "-1"]
    if "max_time" in budget:
        cmd += ["--trainer.max_time", str(budget["max_time"])]
    cmd += ["--trainer.default_root_dir", str(run_dir)]
    cmd += ["--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", "tb"]
    cmd += ["--trainer.logger.init_args.version", "0"]
    ckpt = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"]
    ckpt += ["--trainer.callbacks.dirpath", str(run_dir / "ckpts"), "--trainer.callbacks.save_last", "true"]
    ckpt += ["--trainer.callbacks.filename", "step={step:06d}", "--trainer.callbacks.auto_insert_metric_name", "false"]
    if train["checkpoint_every"]:
        ckpt += ["--trainer.callbacks.every_n_train_steps", str(train["checkpoint_every"])]
        ckpt += ["--trainer.callbacks.save_top_k", "-1"]
    else:
        ckpt += ["--trainer.callbacks.save_top_k", "0"]
    cmd += ckpt
    last = run_dir / "ckpts" / "last.ckpt"
    if last.is_file():
        cmd += ["--ckpt_path", str(last)]
    return cmd


def train_run(spec: dict[str, Any], runs_dir: Path, data_root: str | None, threads: int) -> dict[str, Any]:
    """Train one run unless ``train.json`` says it is done; returns that record."""
    run_dir = runs_dir / spec["id"]
    done = run_dir / "train.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("config_sha256") not in (None, config_digests(spec["train"])):
            raise StudyError(
                f"a base config of run {spec['id']} ({', '.join(spec['train']['base'])}) changed since it was trained;"
                f" revert it, or delete {run_dir} to train again"
            )
        return record
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec["train"], indent=2))
    cmd = fit_command(spec["train"], run_dir, data_root)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"[train] {spec['id']} ({spec['variant']}, seed {spec['seed']}): log in {run_dir / 'fit.log'}", flush=True)
    start = time.perf_counter()
    with open(run_dir / "fit.log", "a") as log:
        proc = subprocess.run(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    attempts = _log_attempt(run_dir, seconds, proc.returncode)
    if proc.returncode != 0:
        tail = (run_dir / "fit.log").read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"training {spec['id']} failed (exit {proc.returncode}): {tail[0]}; see {run_dir}/fit.log")
    import torch

    state = torch.load(run_dir / "ckpts" / "last.ckpt", map_location="cpu", weights_only=True)
    record = {
        "command": " ".join(cmd),
        "wall_seconds": sum(a["seconds"] for a in attempts),
        "attempts": len(attempts),
        "global_step": int(state["global_step"]),
        "epochs": int(state["epoch"]),
        "threads": threads,
        "checkpoints": [[step, path.name] for step, path in _checkpoint_files(run_dir)],
        "config_sha256": config_digests(spec["train"]),
    }
    done.write_text(json.dumps(record, indent=2))
    print(f"[train] {spec['id']} done: {record['global_step']} steps in {seconds / 60:.1f} min", flush=True)
    return record


def _log_attempt(run_dir: Path, seconds: float, returncode: int) -> list[dict[str, Any]]:
    """Append this ``ddpm fit`` attempt to ``attempts.jsonl``; all attempts so far (a resumed run has several)."""
    path = run_dir / "attempts.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({"seconds": round(seconds, 1), "returncode": returncode}) + "\n")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(global step, path) of a finished run's checkpoints, as ``train.json`` lists them (the files themselves are
    not needed to rebuild the report, and are not committed)."""
    record = json.loads((run_dir / "train.json").read_text())
    return [(int(step), run_dir / "ckpts" / name) for step, name in record["checkpoints"]]


def _checkpoint_files(run_dir: Path) -> list[tuple[int, Path]]:
    """(global step, path) of the run's step checkpoints and its final ``last.ckpt``, one per step, by step."""
    import torch

    found: dict[int, Path] = {}
    for path in sorted((run_dir / "ckpts").glob("step=*.ckpt")):
        found[int(path.stem.split("=")[1])] = path
    last = run_dir / "ckpts" / "last.ckpt"
    if last.is_file():
        step = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
        found.setdefault(step, last)
    return sorted(found.items())


# -- evaluation --------------------------------------------------------------------------------------------------
def evaluate_run(spec: dict[str, Any], study: dict[str, Any], runs_dir: Path, data_root: str | None) -> None:
    """Evaluate the run's checkpoints with every evaluation of the study; results cached per (checkpoint, settings)."""
    from ddpm_lightning.callbacks.metrics import SampleMetrics
    from ddpm_lightning.commands import _datamodule_from_config

    run_dir = runs_dir / spec["id"]
    ckpts = checkpoints(run_dir)
    datamodule = None
    for name, ev in study["evaluations"].items():
        chosen = ckpts if ev["checkpoints"] == "all" else ckpts[-1:]
        for step, path in chosen:
            out = result_path(run_dir, step, ev)
            if out.is_file():
                continue
            if datamodule is None:
                datamodule = _datamodule_from_config(str(ROOT / spec["train"]["base"][-1]), data_root)
            model = load_weights(path, ev["weights"])
            res = SampleMetrics(**metric_settings(ev)).compute(model, datamodule)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"step": step, "checkpoint": path.name, "settings": ev, **res}, indent=2))
            print(f"[eval] {spec['id']} {spec['variant']} {name} step {step}: {_short(res)}", flush=True)


def real_floor(study: dict[str, Any], ev: dict[str, Any], runs_dir: Path, data_root: str | None) -> dict[str, Any]:
    """FID/KID of N real *training* images against the evaluation's reference: what a perfect model would score
    with the same N (the finite-sample bias of FID). Cached in ``runs/floors/``."""
    from ddpm_lightning.callbacks.metrics import SampleMetrics
    from ddpm_lightning.commands import _datamodule_from_config
    from ddpm_lightning.metrics.evaluate import extract, real_images, reference_stats
    from ddpm_lightning.metrics.stats import FeatureStats, fid, kid

    key = floor_key(study, ev)
    path = runs_dir / "floors" / f"{_digest(key)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    metric = SampleMetrics(**metric_settings(ev))
    s = metric.settings
    datamodule = _datamodule_from_config(str(ROOT / study["base"][-1]), data_root)
    extractor = metric._extractor("classifier", "cpu")
    ref, _, _ = reference_stats(datamodule, s["reference_split"], s["reference_num"], extractor, metric.cache_dir)
    feats, _ = extract(extractor, real_images(datamodule, "train", s["num_samples"], seed=1))
    k, k_std = kid(feats, ref.features)
    floor = {**key, "fid_classifier": fid(FeatureStats.from_features(feats), ref), "kid_classifier": k}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(floor, indent=2))
    return floor


def floor_key(study: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": study["base"][-1],
        "num": ev.get("num_samples", 1000),
        "classifier": ev.get("classifier", "mnist"),
        "split": ev.get("reference_split", "test"),
    }


def result_path(run_dir: Path, step: int, ev: dict[str, Any]) -> Path:
    return run_dir / "eval" / f"step={step:06d}-{_digest(ev)}.json"


def load_weights(path: Path, weights: str):
    """The checkpoint's module with its EMA weights (``state_dict``) or its raw training weights."""
    import torch

    from ddpm_lightning.commands import load_model

    model = load_model(path, "cpu")
    if weights == "raw":
        state = torch.load(path, map_location="cpu", weights_only=True)
        raw = state.get("current_model_state")
        if raw is None:
            raise ValueError(f"{path} has no raw weights (trained without the EMA callback)")
        model.load_state_dict(raw)
    return model.eval()


def _short(res: dict[str, float]) -> str:
    keys = [k for k in res if k.startswith(("fid_", "cond_acc"))]
    return "  ".join(f"{k}={res[k]:.4g}" for k in keys)


def sample_grid(spec: dict[str, Any], study: dict[str, Any], runs_dir: Path, out: Path) -> Path | None:
    """A grid of the run's last checkpoint (EMA weights; one row per class when conditional), cached as PNG."""
    from torchvision.utils import make_grid, save_image

    from ddpm_lightning.metrics.evaluate import generate

    run_dir = runs_dir / spec["id"]
    ckpts = checkpoints(run_dir)
    if not ckpts:
        return None
    g = {"num_samples": 80, "num_steps": 50, "guidance_scale": 1.0, "sampler": "ddim", **(study.get("grid") or {})}
    png = run_dir / f"grid-step={ckpts[-1][0]:06d}-{_digest(g)}.png"
    if not png.is_file():
        model = load_weights(ckpts[-1][1], "ema")
        n = g["num_samples"]
        k = model.hparams.num_classes if model.conditional else int(math.sqrt(n))
        # column-major labels: row r holds class r when conditional
        idx = list(range(n))
        labels = [i // (n // k) for i in idx] if model.conditional else None
        images, _ = generate(
            model,
            idx,
            sampler=g["sampler"],
            num_steps=min(g["num_steps"], model.diffusion.num_timesteps),
            guidance_scale=g["guidance_scale"],
            labels=labels,
        )
        save_image(make_grid(images.float() / 255, nrow=n // k, padding=2, pad_value=1.0), png)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, out)
    return out


# -- main --------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="*", help="study names (files in experiments/studies); default: all")
    p.add_argument("--data_root", default=None, help="data root for every run (turns the download off)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (each gets threads / jobs threads)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all (default: all cores)")
    p.add_argument("--runs_dir", default=str(RUNS_DIR))
    p.add_argument("--report", default=str(REPORT))
    p.add_argument("--report_only", action="store_true", help="rebuild the report from saved results only")
    p.add_argument("--train_only", action="store_true", help="train the runs, evaluate nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        studies = find_studies(args.studies)
        if args.jobs < 1 or args.threads < 1:
            raise StudyError("--jobs and --threads must be >= 1")
    except StudyError as err:
        print(f"experiments: error: {err}", file=sys.stderr)
        return 2
    try:
        _run(args, studies)
    except StudyError as err:
        print(f"experiments: error: {err}", file=sys.stderr)
        return 2
    if not args.train_only:
        print(f"wrote {args.report}")
    return 0


def _run(args: argparse.Namespace, studies: list[dict[str, Any]]) -> None:
    runs_dir = Path(args.runs_dir).resolve()
    if args.data_root is not None:  # training runs in the run folder: a relative root must not move with it
        args.data_root = str(Path(args.data_root).resolve())
    all_specs = {s["id"]: s for study in studies for s in run_specs(study)}
    if not args.report_only:
        threads = max(1, args.threads // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda s: train_run(s, runs_dir, args.data_root, threads), all_specs.values()))
        if not args.train_only:
            import torch

            torch.set_num_threads(args.threads)
            for study in studies:
                for ev in study["evaluations"].values():
                    real_floor(study, ev, runs_dir, args.data_root)
                for spec in run_specs(study):
                    evaluate_run(spec, study, runs_dir, args.data_root)
    if args.train_only:
        return
    from experiments.report import write_report

    write_report(studies, runs_dir, Path(args.report), make_grids=not args.report_only)


if __name__ == "__main__":
    sys.exit(main())

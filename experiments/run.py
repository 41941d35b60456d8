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
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from experiments import evaluation
from experiments.study import (
    REPORT,
    ROOT,
    RUNS_DIR,
    TB_NAME,
    TB_VERSION,
    StudyError,
    checkpoint_files,
    config_digests,
    config_file_digests,
    find_studies,
    run_specs,
)


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
    cmd += ["--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", TB_NAME]
    cmd += ["--trainer.logger.init_args.version", str(TB_VERSION)]
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


def config_unchanged(record: dict[str, Any], train: dict[str, Any]) -> bool:
    """Whether the base configs still say what they said about training when the run recorded in ``record`` was
    trained: its ``training_config_sha256`` (:func:`~experiments.study.config_digests`), or for runs recorded before
    that, the files' bytes (``config_sha256``); a record with neither predates the check."""
    if "training_config_sha256" in record:
        return record["training_config_sha256"] == config_digests(train)
    return record.get("config_sha256") in (None, config_file_digests(train))


def train_run(spec: dict[str, Any], runs_dir: Path, data_root: str | None, threads: int) -> dict[str, Any]:
    """Train one run unless ``train.json`` says it is done; returns that record."""
    run_dir = runs_dir / spec["id"]
    done = run_dir / "train.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if not config_unchanged(record, spec["train"]):
            raise StudyError(
                f"a base config of run {spec['id']} ({', '.join(spec['train']['base'])}) changed since it was trained;"
                f" revert it, or delete {run_dir} to train again"
            )
        if "training_config_sha256" not in record:  # recorded before the digest left out the sampling sections
            record["training_config_sha256"] = config_digests(spec["train"])
            done.write_text(json.dumps(record, indent=2))
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
        "checkpoints": [[step, path.name] for step, path in checkpoint_files(run_dir)],
        "training_config_sha256": config_digests(spec["train"]),
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


def _evaluate_as_trained(args: argparse.Namespace, studies, trainings: dict, runs_dir: Path) -> None:
    import torch

    torch.set_num_threads(args.threads)
    for study in studies:
        for ev in study["evaluations"].values():
            evaluation.real_floor(study, ev, runs_dir, args.data_root)
    for future in as_completed(trainings):
        if future.exception() is not None:
            continue
        run_id = trainings[future]["id"]
        for study in studies:
            for spec in run_specs(study):
                if spec["id"] == run_id:
                    evaluation.evaluate_run(spec, study, runs_dir, args.data_root)


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
    p.add_argument(
        "--variants", nargs="+", default=None, help="train and evaluate only these variants (the report shows all)"
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="train and evaluate only these seeds (the report shows all)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        studies = find_studies(args.studies)
        if args.jobs < 1 or args.threads < 1:
            raise StudyError("--jobs and --threads must be >= 1")
        _check_known("variant", args.variants, {v for study in studies for v in study["variants"]})
        _check_known("seed", args.seeds, {seed for study in studies for seed in study["seeds"]})
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


def _check_known(kind: str, asked: Sequence[Any] | None, known: set[Any]) -> None:
    """One line naming what ``--variants`` / ``--seeds`` asked for that no study has, and what the studies have."""
    unknown = sorted(set(asked or ()) - known)
    if unknown:
        raise StudyError(f"unknown {kind}(s) {unknown}; the studies have: {', '.join(map(str, sorted(known)))}")


def _run(args: argparse.Namespace, studies: list[dict[str, Any]]) -> None:
    runs_dir = Path(args.runs_dir).resolve()
    if args.data_root is not None:  # training runs in the run folder: a relative root must not move with it
        args.data_root = str(Path(args.data_root).resolve())
    all_specs = {s["id"]: s for study in studies for s in run_specs(study)}
    if args.variants is not None:
        all_specs = {k: s for k, s in all_specs.items() if s["variant"] in args.variants}
    if args.seeds is not None:
        all_specs = {k: s for k, s in all_specs.items() if s["seed"] in args.seeds}
    if not args.report_only:
        threads = max(1, args.threads // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            trainings = {pool.submit(train_run, s, runs_dir, args.data_root, threads): s for s in all_specs.values()}
            if not args.train_only:  # each run is evaluated as soon as it is trained: results come as they go
                _evaluate_as_trained(args, studies, trainings, runs_dir)
            for future in trainings:
                future.result()  # a failed training stops the study here, after the others' results are saved
    if args.train_only:
        return
    from experiments.report import write_report  # matplotlib and TensorBoard's reader: only when reporting

    grids = set() if args.report_only else {s["name"] for s in studies}  # draw missing grids of the studies run
    write_report(report_studies(studies), runs_dir, Path(args.report), make_grids=grids)


def report_studies(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The studies the report shows: every shipped study when those run are all shipped ones (running one study
    must not drop the others' sections from the shared report), else just those run."""
    shipped = {s["name"]: s for s in find_studies([])}
    if any(s["name"] not in shipped or s["path"] != shipped[s["name"]]["path"] for s in studies):
        return studies
    return [{**shipped, **{s["name"]: s for s in studies}}[name] for name in shipped]


if __name__ == "__main__":
    sys.exit(main())

"""Study files and the on-disk layout of their runs: what to train (run specs and their ids), where checkpoints and
evaluation results live. Shared by the runner (:mod:`experiments.run`), the evaluation (:mod:`experiments.evaluation`)
and the report (:mod:`experiments.report`); it imports none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
STUDIES_DIR = ROOT / "experiments" / "studies"
RUNS_DIR = ROOT / "experiments" / "runs"
# each run logs to <run>/tb/version_0 (TensorBoard); a recipe's own checkpoint callbacks write beside it
TB_NAME, TB_VERSION = "tb", 0


def tb_checkpoint_dir(run_dir: Path) -> Path:
    """Where a recipe's own callbacks (ModelCheckpoint, PostHocEMA with its default folder) write in a run."""
    return run_dir / TB_NAME / f"version_{TB_VERSION}" / "checkpoints"


REPORT = ROOT / "experiments" / "REPORT.md"
STUDY_KEYS = {"title", "question", "source", "base", "overrides", "budget", "checkpoint_every", "seeds", "variants"}
STUDY_KEYS |= {"evaluations", "discussion", "grid", "sweep", "budget_minutes"}
BUDGET_KEYS = ("max_steps", "max_time")
EVAL_KEYS = {"checkpoints", "weights", "sigma_rel", "variants"}  # variants: score only these (default: all)
CHECKPOINT_CHOICES = ("all", "last")
WEIGHT_CHOICES = ("ema", "raw", "phema")  # phema: the post-hoc EMA of ``sigma_rel`` from the run's snapshots


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
    study["path"] = str(path.resolve())
    study["base"] = _base_configs(study["base"], f"{path.name}: ")
    budget = study["budget"]
    if not isinstance(budget, dict) or not budget or set(budget) - set(BUDGET_KEYS):
        raise StudyError(f"{path.name}: budget must set one or both of: {', '.join(BUDGET_KEYS)}")
    study.setdefault("overrides", {})
    study.setdefault("seeds", [0])
    study.setdefault("checkpoint_every", None)
    study["variants"] = {str(k): dict(v or {}) for k, v in study["variants"].items()}
    for variant, overrides in study["variants"].items():  # a variant's own budget (e.g. steps at its own speed)
        own = overrides.get("budget", {})
        if not isinstance(own, dict) or set(own) - set(BUDGET_KEYS):
            raise StudyError(f"{path.name}: variant {variant!r}: budget may set only: {', '.join(BUDGET_KEYS)}")
        if "base" in overrides:  # a variant's own base config(s): a whole recipe against the study's base
            overrides["base"] = _base_configs(overrides["base"], f"{path.name}: variant {variant!r}: ")
    for where, minutes in [("", study.get("budget_minutes"))] + [
        (f"variant {v!r}: ", o.get("budget_minutes")) for v, o in study["variants"].items()
    ]:  # a variant's own minutes: designs compared at different budgets (15 vs 30 minutes)
        if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
            raise StudyError(f"{path.name}: {where}budget_minutes must be a number > 0, got {minutes!r}")
    evals = study["evaluations"]
    if not isinstance(evals, dict) or not evals:
        raise StudyError(f"{path.name}: evaluations must map names to settings")

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
        unknown = set(ev.get("variants", [])) - set(study["variants"])
        if unknown:
            raise StudyError(f"{path.name}: evaluation {name!r}: unknown variant(s) {sorted(unknown)}")
        if (ev["weights"] == "phema") != ("sigma_rel" in ev):
            raise StudyError(f"{path.name}: evaluation {name!r}: sigma_rel goes with weights: phema, and only with it")
        try:
            if ev["weights"] == "phema":
                from ddpm_lightning.phema import sigma_rel_to_gamma

                sigma_rel_to_gamma(ev["sigma_rel"])
            evaluator(ev)
        except (TypeError, ValueError) as err:
            raise StudyError(f"{path.name}: evaluation {name!r}: {err}") from None
    return study


def evaluator(ev: dict[str, Any]):
    """The :class:`~ddpm_lightning.metrics.Evaluator` of a study's evaluation (its keys other than checkpoints and
    weights: the sampling settings and the evaluator's own)."""
    from ddpm_lightning.metrics import Evaluator
    from ddpm_lightning.sampling import SamplingConfig

    settings = {k: v for k, v in ev.items() if k not in EVAL_KEYS}
    fields = set(SamplingConfig.__dataclass_fields__)
    sampling = SamplingConfig.of({k: v for k, v in settings.items() if k in fields})
    return Evaluator(sampling=sampling, **{k: v for k, v in settings.items() if k not in fields})


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
def digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def _base_configs(base: str | list[str], where: str) -> list[str]:
    """One config path or a list of them, each checked to exist (relative to the repository)."""
    configs = [base] if isinstance(base, str) else list(base)
    for cfg in configs:
        if not (ROOT / cfg).is_file():
            raise StudyError(f"{where}base config {cfg!r} does not exist")
    return configs


def run_specs(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One training spec per (variant, seed); its ``id`` is a digest of everything that decides the training."""
    specs = []
    for variant, overrides in study["variants"].items():
        overrides = dict(overrides)
        budget = {**study["budget"], **overrides.pop("budget", {})}
        overrides.pop("budget_minutes", None)  # report-only: the x axis of the curves
        base = overrides.pop("base", study["base"])
        for seed in study["seeds"]:
            train = {
                "base": base,
                "overrides": {**study["overrides"], **overrides},
                "budget": budget,
                "checkpoint_every": study["checkpoint_every"],
                "seed": seed,
            }
            stem = Path(base[0]).stem
            specs.append({"variant": variant, "seed": seed, "train": train, "id": f"{stem}-{digest(train)}"})
    return specs


def minutes_per_step(study: dict[str, Any], variant: str) -> float | None:
    """Wall-minutes one training step of ``variant`` stands for, when the study gives its step budgets as
    ``budget_minutes`` of a quiet machine (each variant's ``max_steps`` = those minutes at its own measured speed)."""
    minutes = study["variants"][variant].get("budget_minutes", study.get("budget_minutes"))
    if minutes is None:
        return None
    steps = {**study["budget"], **study["variants"][variant].get("budget", {})}.get("max_steps")
    return minutes / steps if steps else None


#: sections of a recipe that decide only how samples are drawn after training (``ddpm sample`` / ``ddpm test``)
SAMPLING_ONLY_SECTIONS = (("metrics",), ("model", "sampling"))


def training_sections(config: dict[str, Any]) -> dict[str, Any]:
    """A parsed recipe without :data:`SAMPLING_ONLY_SECTIONS` (and, being parsed, without its comments)."""
    config = json.loads(json.dumps(config))  # a deep copy
    for *parents, key in SAMPLING_ONLY_SECTIONS:
        section = config
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(key, None)
    return config


def config_digests(train: dict[str, Any]) -> dict[str, str]:
    """SHA-256 (12 hex digits) of what each base config says about training (:func:`training_sections`): a finished
    run is reused while that is unchanged, so a recipe's comments and default sampler can change under it."""
    return {cfg: digest(training_sections(yaml.safe_load((ROOT / cfg).read_text()) or {}), 12) for cfg in train["base"]}


def config_file_digests(train: dict[str, Any]) -> dict[str, str]:
    """SHA-256 (12 hex digits) of each base config file's bytes: what runs recorded before :func:`config_digests`."""
    return {cfg: hashlib.sha256((ROOT / cfg).read_bytes()).hexdigest()[:12] for cfg in train["base"]}


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(global step, path) of a finished run's checkpoints, as ``train.json`` lists them (the files themselves are
    not needed to rebuild the report, and are not committed)."""
    record = json.loads((run_dir / "train.json").read_text())
    return [(int(step), run_dir / "ckpts" / name) for step, name in record["checkpoints"]]


def checkpoint_files(run_dir: Path) -> list[tuple[int, Path]]:
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


def floor_key(study: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": study["base"][-1],
        "num": ev.get("num_samples", 1000),
        "classifier": ev.get("classifier", "mnist"),
        "split": ev.get("reference_split", "test"),
    }


def result_path(run_dir: Path, step: int, ev: dict[str, Any]) -> Path:
    return run_dir / "eval" / f"step={step:06d}-{digest(ev)}.json"

"""Evaluation of the runs' checkpoints (cached per checkpoint and settings), the real-vs-real floors, sample grids."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from experiments.study import (
    ROOT,
    StudyError,
    checkpoints,
    digest,
    evaluator,
    floor_key,
    result_path,
    tb_checkpoint_dir,
)


# -- evaluation --------------------------------------------------------------------------------------------------
def evaluate_run(spec: dict[str, Any], study: dict[str, Any], runs_dir: Path, data_root: str | None) -> None:
    """Evaluate the run's checkpoints with every evaluation of the study; results cached per (checkpoint, settings)."""
    from ddpm_lightning.cli import datamodule_from_recipe

    run_dir = runs_dir / spec["id"]
    ckpts = checkpoints(run_dir)
    datamodule = None
    for name, ev in study["evaluations"].items():
        if spec["variant"] not in ev.get("variants", [spec["variant"]]):
            continue
        chosen = ckpts if ev["checkpoints"] == "all" else ckpts[-1:]
        for step, path in chosen:
            out = result_path(run_dir, step, ev)
            if out.is_file():
                continue
            if not path.is_file():  # a committed run record whose git-ignored checkpoints are gone (a fresh clone)
                raise StudyError(
                    f"run {spec['id']} ({spec['variant']}, seed {spec['seed']}) was trained, but evaluation {name!r}"
                    f" needs {path.relative_to(run_dir)} and it is gone (checkpoints are not committed);"
                    f" delete {run_dir} to train the run again"
                )
            if datamodule is None:
                datamodule = datamodule_from_recipe(ROOT / spec["train"]["base"][-1], data_root)
            model = load_weights(path, ev["weights"], ev.get("sigma_rel"), step)
            res = evaluator(ev).evaluate(model, datamodule)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"step": step, "checkpoint": path.name, "settings": ev, **res}, indent=2))
            print(f"[eval] {spec['id']} {spec['variant']} {name} step {step}: {_short(res)}", flush=True)


def real_floor(study: dict[str, Any], ev: dict[str, Any], runs_dir: Path, data_root: str | None) -> dict[str, Any]:
    """FID/KID of N real *training* images against the evaluation's reference: what a perfect model would score
    with the same N (the finite-sample bias of FID). Cached in ``runs/floors/``."""
    from ddpm_lightning.cli import datamodule_from_recipe

    key = floor_key(study, ev)
    path = runs_dir / "floors" / f"{digest(key)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    datamodule = datamodule_from_recipe(ROOT / study["base"][-1], data_root)
    floor = {**key, **evaluator(ev).real_floor(datamodule, "classifier")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(floor, indent=2))
    return floor


def load_weights(path: Path, weights: str, sigma_rel: float | None = None, step: int | None = None):
    """The checkpoint's module with its EMA weights (``state_dict``), its raw training weights, or the post-hoc EMA
    of ``sigma_rel`` at ``step``, reconstructed from the run's post-hoc EMA snapshots (:func:`snapshot_dir`)."""
    import torch

    from ddpm_lightning.module import DiffusionModule

    model = DiffusionModule.from_checkpoint(path, "cpu")
    if weights == "phema":
        from ddpm_lightning.commands.phema import load_snapshots, reconstruct

        ema, _ = reconstruct(load_snapshots(snapshot_dir(path), step), sigma_rel)
        model.load_state_dict({**model.state_dict(), **ema})
    if weights == "raw":
        state = torch.load(path, map_location="cpu", weights_only=True)
        raw = state.get("current_model_state")
        if raw is None:
            raise ValueError(f"{path} has no raw weights (trained without the EMA callback)")
        model.load_state_dict(raw)
    return model.eval()


def snapshot_dir(path: Path) -> Path:
    """The folder whose ``phema/`` holds the run's post-hoc EMA snapshots: beside the checkpoint (a variant's
    ``dirpath: ckpts/phema``), else beside the recipe's own checkpoints (a recipe that keeps PostHocEMA with its
    default folder, as configs/mnist_conditional.yaml does: ``<run>/tb/version_0/checkpoints/phema``)."""
    for folder in (path.parent, tb_checkpoint_dir(path.parent.parent)):
        if (folder / "phema").is_dir():
            return folder
    return path.parent  # load_snapshots names the folder it looked in


def _short(res: dict[str, float]) -> str:
    keys = [k for k in res if k.startswith(("fid_", "cond_acc"))]
    return "  ".join(f"{k}={res[k]:.4g}" for k in keys)


def sample_grid(spec: dict[str, Any], study: dict[str, Any], runs_dir: Path, out: Path) -> Path | None:
    """A grid of the run's last checkpoint (EMA weights; one row per class when conditional), cached as PNG."""
    from ddpm_lightning.images import grid, save_png
    from ddpm_lightning.metrics.evaluate import generate
    from ddpm_lightning.sampling import SamplingConfig

    run_dir = runs_dir / spec["id"]
    ckpts = checkpoints(run_dir)
    if not ckpts:
        return None
    g = {"num_samples": 80, "num_steps": 50, "guidance_scale": 1.0, "sampler": "ddim", **(study.get("grid") or {})}
    png = run_dir / f"grid-step={ckpts[-1][0]:06d}-{digest(g)}.png"
    if not png.is_file():
        model = load_weights(ckpts[-1][1], "ema")
        n = g.pop("num_samples")
        k = model.hparams.num_classes if model.conditional else int(math.sqrt(n))
        # column-major labels: row r holds class r when conditional
        idx = list(range(n))
        labels = [i // (n // k) for i in idx] if model.conditional else None
        g["num_steps"] = min(g["num_steps"], model.diffusion.num_timesteps)
        images, _ = generate(model, idx, sampling=SamplingConfig.of(g), labels=labels)
        save_png(grid(images, nrow=n // k), png)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, out)
    return out

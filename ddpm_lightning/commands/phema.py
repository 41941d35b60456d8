"""``ddpm phema``: the EMA of any length after training, from the snapshots of the PostHocEMA callback.

    ddpm phema --ckpt_dir lightning_logs/version_0/checkpoints --sigma_rel 0.03 --out ema-0.03.ckpt
    ddpm phema --ckpt_dir DIR --decay 0.999 --out ema-decay0.999.ckpt          # the classic EMA it equals
    ddpm phema --config configs/mnist_conditional.yaml --ckpt_dir DIR --sweep true \\
        --sigma_rel 0.02 0.05 0.1 0.2                                              # score each with the metrics

The least-squares combination of the snapshots in ``DIR/phema/`` (Karras et al. 2024, Appendix C; see
:mod:`ddpm_lightning.phema`) replaces the weights of a base checkpoint (``DIR/last.ckpt`` by default): the result is
an ordinary checkpoint that every command loads (``ddpm sample``, ``test``, ``export``, ...). Only snapshots up to
the reconstructed step are used; ``--step`` picks an earlier one than the last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from ddpm_lightning.callbacks.phema import SNAPSHOT_DIR
from ddpm_lightning.checkpointing import AtomicCheckpointIO, checkpoint_load_error
from ddpm_lightning.commands import sweep
from ddpm_lightning.commands.base import add_sampling_arguments, sampling_from, say
from ddpm_lightning.commands.sweep import EVALUATOR_KEYS
from ddpm_lightning.phema import combine, decay_to_sigma_rel, sigma_rel_to_gamma, solve_coefficients

DESCRIPTION = "Reconstruct the EMA of any length (sigma_rel or classic decay) from post-hoc EMA snapshots."


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--ckpt_dir", type=str, required=True, help="a run's checkpoint folder (with phema/ in it)")
    parser.add_argument("--sigma_rel", type=float, nargs="+", default=[], help="EMA length(s) relative to training")
    parser.add_argument("--decay", type=float, nargs="+", default=[], help="classic EMA decay(s), as sigma_rel")
    parser.add_argument("--step", type=int | None, default=None, help="reconstruct at this snapshot step (last)")
    parser.add_argument("--base", type=str | None, default=None, help="checkpoint whose weights are replaced")
    parser.add_argument("--out", type=str | None, default=None, help="output checkpoint (one EMA length only)")
    parser.add_argument("--out_dir", type=str | None, default=None, help="folder of the outputs (default ckpt_dir)")
    parser.add_argument("--sweep", type=bool, default=False, help="score each reconstruction with the metrics")
    parser.add_argument("--recipe", type=str | None, default=None, help="training recipe (data, metrics) for --sweep")
    parser.add_argument("--data_root", type=str | None, default=None, help="override data.root (download off)")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--extractors", type=str, nargs="+", default=["classifier"])
    parser.add_argument("--classifier", type=str, default="mnist")
    parser.add_argument("--inception_weights", type=str | None, default=None)
    parser.add_argument("--device", type=str, default="auto")
    add_sampling_arguments(parser, what="the recipe's metrics.sampling, else the checkpoint's model.sampling")


def from_recipe(recipe: dict[str, Any], path: str) -> dict[str, Any]:
    """As ``ddpm sweep``: the recipe's path (for its data), its metrics settings and their sampling."""
    return sweep.from_recipe(recipe, path)


def load_snapshots(ckpt_dir: Path, step: int | None) -> list[dict[str, Any]]:
    """The snapshots in ``ckpt_dir/phema`` up to ``step`` (all when None), by step; one-line errors."""
    folder = ckpt_dir / SNAPSHOT_DIR
    paths = sorted(folder.glob("phema-*.pt"))
    if not paths:
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots in {str(folder)!r}: train with the PostHocEMA callback "
            "(trainer.callbacks: ddpm_lightning.callbacks.PostHocEMA)"
        )
    snapshots = []
    for path in paths:
        try:
            snap = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise (checkpoint_load_error(path, err) or ValueError(f"cannot read snapshot {str(path)!r}")) from None
        if step is None or snap["step"] <= step:
            snapshots.append(snap)
    if not snapshots:
        raise ValueError(f"--step {step}: the first snapshot in {str(folder)!r} is at step {paths[0].stem[6:]}")
    if step is not None and snapshots[-1]["step"] != step:
        raise ValueError(f"--step {step}: no snapshot at that step (the nearest before it: {snapshots[-1]['step']})")
    return snapshots


def reconstruct(snapshots: list[dict[str, Any]], sigma_rel: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The EMA of ``sigma_rel`` at the last snapshot's step, and the coefficients of every (snapshot, EMA) pair."""
    steps, gammas, states = [], [], []
    for snap in snapshots:
        for gamma, state in zip(snap["gammas"], snap["states"]):
            steps.append(snap["step"])
            gammas.append(gamma)
            states.append(state)
    coefficients = solve_coefficients(steps, gammas, snapshots[-1]["step"], sigma_rel_to_gamma(sigma_rel))
    return combine(states, coefficients), [float(c) for c in coefficients]


def targets(cfg: Namespace, step: int) -> list[tuple[str, float]]:
    """(name, sigma_rel) of every EMA asked for: ``--sigma_rel`` as given, ``--decay`` converted at ``step``."""
    out = [(f"sigma_rel={s:g}", s) for s in cfg.sigma_rel]
    out += [(f"decay={d:g}", decay_to_sigma_rel(d, step)) for d in cfg.decay]
    if not out:
        raise ValueError("give at least one --sigma_rel or --decay")
    if cfg.out is not None and len(out) > 1:
        raise ValueError("--out names one file: with several EMA lengths use --out_dir")
    for name, s in out:
        try:
            sigma_rel_to_gamma(s)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return out


def write_checkpoint(base: dict[str, Any], weights: dict[str, torch.Tensor], path: Path, info: dict) -> None:
    """``base`` with its ``state_dict`` weights replaced by ``weights`` (and a ``phema`` record), written atomically."""
    missing = set(weights) - set(base["state_dict"])
    if missing:
        raise ValueError(f"the snapshots hold tensors the base checkpoint lacks: {sorted(missing)[:3]} ...")
    state = dict(base["state_dict"])
    state.update(weights)
    AtomicCheckpointIO().save_checkpoint({**base, "state_dict": state, "phema": info}, path)


def run(cfg: Namespace) -> list[dict[str, Any]]:
    ckpt_dir = Path(cfg.ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"--ckpt_dir {str(ckpt_dir)!r} is not a folder")
    snapshots = load_snapshots(ckpt_dir, cfg.step)
    step = int(snapshots[-1]["step"])
    wanted = targets(cfg, step)
    base_path = Path(cfg.base) if cfg.base else ckpt_dir / "last.ckpt"
    if not base_path.is_file():
        raise FileNotFoundError(f"base checkpoint {str(base_path)!r} does not exist (give --base)")
    try:
        base = torch.load(base_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise (checkpoint_load_error(base_path, err) or ValueError(f"cannot read {str(base_path)!r}")) from None
    out_dir = Path(cfg.out_dir) if cfg.out_dir else ckpt_dir
    rows = []
    for name, sigma_rel in wanted:
        weights, coefficients = reconstruct(snapshots, sigma_rel)
        path = Path(cfg.out) if cfg.out else out_dir / f"phema-step={step:07d}-{name}.ckpt"
        info = {"sigma_rel": sigma_rel, "step": step, "asked": name, "coefficients": coefficients}
        write_checkpoint(base, weights, path, info)
        say(f"{name}: sigma_rel {sigma_rel:.4f} at step {step} from {len(coefficients)} snapshot EMAs -> {path}")
        rows.append({"name": name, "sigma_rel": sigma_rel, "step": step, "checkpoint": str(path)})
    if cfg.sweep:
        rows = score(cfg, rows)
        (out_dir / "phema-sweep.json").write_text(json.dumps(rows, indent=2))
        say(f"wrote {out_dir / 'phema-sweep.json'}")
    return rows


def score(cfg: Namespace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each reconstruction scored by one Evaluator (the recipe's data and metrics settings)."""
    from ddpm_lightning.cli import datamodule_from_recipe
    from ddpm_lightning.metrics.evaluator import Evaluator
    from ddpm_lightning.module import DiffusionModule

    if cfg.recipe is None:
        raise ValueError("--sweep scores against real data: give the training recipe (--config RECIPE or --recipe)")
    datamodule = datamodule_from_recipe(cfg.recipe, data_root=cfg.data_root)
    evaluator = None
    for row in rows:
        model = DiffusionModule.from_checkpoint(row["checkpoint"], cfg.device)
        if evaluator is None:
            args = {k: cfg[k] for k in EVALUATOR_KEYS}
            evaluator = Evaluator(sampling=sampling_from(cfg, model.sampling), background=True, **args)
        row.update(evaluator.evaluate(model, datamodule, progress=True))
        keys = [k for k in row if k.startswith(("fid_", "cond_acc", "background")) and not k.endswith("_std")]
        say(f"{row['name']:>16}  " + "  ".join(f"{k}={row[k]:.4g}" for k in keys))
    return rows

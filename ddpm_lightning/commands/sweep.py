"""``ddpm sweep``: sample quality (FID/KID, conditional accuracy) and seconds per sample against the sampling steps.

    ddpm sweep --config configs/mnist_conditional.yaml --ckpt_path CKPT --samplers ddim ddpm --steps 10 50 250

The recipe gives the real data (its ``data`` section, built through the same parser and links as ``ddpm fit``) and
the evaluation settings of its ``metrics`` section; flags override them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from ddpm_lightning.commands.base import add_sampling_arguments, recipe_sampling, sampling_from
from ddpm_lightning.metrics.evaluator import EXTRACTORS, Evaluator
from ddpm_lightning.module import DiffusionModule
from ddpm_lightning.sampling import SAMPLERS, SamplingConfig

DESCRIPTION = "Sample quality and time per sample against the sampling steps (or NFE), for one checkpoint."
EVALUATOR_KEYS = ("num_samples", "seed", "batch_size", "extractors", "classifier", "inception_weights")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--recipe", type=str, required=True, help="the training recipe (its data section)")
    parser.add_argument("--ckpt_path", type=str, required=True)
    parser.add_argument("--data_root", type=str | None, default=None, help="override data.root (download off)")
    parser.add_argument("--samplers", type=str, nargs="+", default=list(SAMPLERS), help=f"of {', '.join(SAMPLERS)}")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 250, 1000])
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--extractors", type=str, nargs="+", default=["classifier"], help=f"of {', '.join(EXTRACTORS)}")
    parser.add_argument("--classifier", type=str, default="mnist")
    parser.add_argument("--inception_weights", type=str | None, default=None)
    parser.add_argument("--out_dir", type=str, default="sweep")
    parser.add_argument("--device", type=str, default="auto")
    add_sampling_arguments(parser, what="the recipe's metrics.sampling, else the checkpoint's model.sampling")


def from_recipe(recipe: dict[str, Any], path: str) -> dict[str, Any]:
    """The recipe path itself (for its data), its metrics settings and their sampling."""
    metrics = dict(recipe.get("metrics") or {})
    sampling = metrics.pop("sampling", None) or recipe_sampling(recipe)
    return {"recipe": path, **{k: v for k, v in metrics.items() if k in EVALUATOR_KEYS}, **sampling}


def plan(samplers: list[str], steps: list[int], base: SamplingConfig, num_timesteps: int) -> list[SamplingConfig]:
    """The settings of each row: every sampler at every step count (capped at T), as the registry says a sampler
    takes k steps (:meth:`SamplingConfig.at_steps`)."""
    counts = sorted({min(s, num_timesteps) for s in steps})
    return [base.replace(sampler=name).at_steps(k, num_timesteps) for name in samplers for k in counts]


def run(cfg: Namespace) -> list[dict]:
    from ddpm_lightning.cli import datamodule_from_recipe

    model = DiffusionModule.from_checkpoint(cfg.ckpt_path, cfg.device)
    datamodule = datamodule_from_recipe(cfg.recipe, data_root=cfg.data_root)
    T = model.diffusion.num_timesteps
    base = sampling_from(cfg, model.sampling)
    rows = []
    for requested, sampling in zip(_labels(cfg, T), plan(cfg.samplers, cfg.steps, base, T)):
        evaluator = Evaluator(sampling=sampling, **{k: cfg[k] for k in EVALUATOR_KEYS})
        res = evaluator.evaluate(model, datamodule, progress=True)
        rows.append({"sampler": requested[0], "steps": requested[1], **res})
        print(format_row(rows[-1]), flush=True)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"settings": cfg.as_dict(), "rows": rows}, indent=2))
    plot_sweep(rows, cfg.extractors[0], out / "sweep.png")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return rows


def _labels(cfg: Namespace, num_timesteps: int) -> list[tuple[str, int]]:
    return [(name, k) for name in cfg.samplers for k in sorted({min(s, num_timesteps) for s in cfg.steps})]


def format_row(row: dict) -> str:
    keys = [k for k in row if k.startswith(("fid_", "kid_", "cond_acc")) and not k.endswith("_std")]
    metrics = "  ".join(f"{k}={row[k]:.4g}" for k in keys)
    seconds = row["sample_seconds_per_1k"] / 1000
    return f"{row['sampler']:>5} {row['steps']:>5} steps  {metrics}  {seconds:.4f} s/sample"


def plot_sweep(rows: list[dict], extractor: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        rs = [r for r in rows if r["sampler"] == sampler]
        steps = [r["steps"] for r in rs]
        ax1.plot(steps, [r[f"fid_{extractor}"] for r in rs], marker="o", label=sampler)
        ax2.plot(steps, [r["sample_seconds_per_1k"] / 1000 for r in rs], marker="o", label=sampler)
    ax1.set(xscale="log", xlabel="sampling steps", ylabel=f"FID ({extractor})", title="quality vs steps")
    ax2.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="seconds per sample", title="cost vs steps")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""``ddpm sweep``: sample quality (FID/KID, conditional accuracy) and seconds per sample against the sampling steps,
or against the network evaluations (NFE) per sample, for several samplers on one checkpoint.

    ddpm sweep --config configs/mnist_conditional.yaml --ckpt_path CKPT --samplers ddim ddpm --steps 10 50 250
    ddpm sweep --config configs/mnist_conditional.yaml --ckpt_path CKPT --samplers ddim dpmpp_2m heun unipc \
        --nfe 10 20 50 100 --guidance_scale 3 --num_samples 1000

NFE counts network evaluations per sample: a guided step evaluates the network on the conditional and the
unconditional input (one batched forward pass of 2B), which counts two. Each sampler takes the most steps whose NFE
fits the budget (Heun: 2 per step but the last); a budget a sampler cannot meet (DDPM below T) is skipped, said.

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
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE budgets per sample (instead of --steps)")
    parser.add_argument("--floor", type=bool, default=True, help="also score N real images: the FID floor at this N")
    parser.add_argument("--append", type=bool, default=False, help="add these rows to out_dir's sweep.json and re-plot")
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


def plan(
    samplers: list[str], steps: list[int], base: SamplingConfig, num_timesteps: int
) -> list[tuple[str, SamplingConfig]]:
    """(sampler asked for, settings) of each row: every sampler at every step count (capped at T), as the registry
    says a sampler takes k steps (:meth:`SamplingConfig.at_steps`)."""
    counts = sorted({min(s, num_timesteps) for s in steps})
    return [(name, base.replace(sampler=name).at_steps(k, num_timesteps)) for name in samplers for k in counts]


def plan_nfe(
    samplers: list[str], budgets: list[int], base: SamplingConfig, num_timesteps: int, conditional: bool
) -> list[tuple[str, SamplingConfig]]:
    """(sampler, settings) of each row: every sampler at the most steps each NFE budget allows (one row per distinct
    setting); budgets a sampler cannot meet are skipped with a note."""
    rows: list[tuple[str, SamplingConfig]] = []
    for name in samplers:
        config = base.replace(sampler=name)
        for budget in sorted(set(budgets)):
            try:
                row = (name, config.at_nfe(budget, num_timesteps, conditional))
            except ValueError as err:
                print(f"skipped: {err}", flush=True)
                continue
            if row not in rows:
                rows.append(row)
    return rows


def run(cfg: Namespace) -> list[dict]:
    from ddpm_lightning.cli import datamodule_from_recipe

    model = DiffusionModule.from_checkpoint(cfg.ckpt_path, cfg.device)
    datamodule = datamodule_from_recipe(cfg.recipe, data_root=cfg.data_root)
    T, conditional = model.diffusion.num_timesteps, model.conditional
    base = sampling_from(cfg, model.sampling)
    if cfg.nfe:
        settings = plan_nfe(cfg.samplers, cfg.nfe, base, T, conditional)
    else:
        settings = plan(cfg.samplers, cfg.steps, base, T)
    evaluator = Evaluator(**{k: cfg[k] for k in EVALUATOR_KEYS})  # one for all rows: feature networks built once
    rows = []
    for name, sampling in settings:
        res = evaluator.evaluate(model, datamodule, progress=True, sampling=sampling)
        steps = sampling.steps(T)
        rows.append({"sampler": name, "steps": steps, "nfe": sampling.nfe(T, conditional), **res})
        rows[-1]["settings"] = sampling.to_dict()
        print(format_row(rows[-1]), flush=True)
    floor = evaluator.real_floor(datamodule, cfg.extractors[0]) if cfg.floor else None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.append and (out / "sweep.json").is_file():  # an earlier sweep of the same checkpoint: one table, one plot
        earlier = json.loads((out / "sweep.json").read_text())
        rows, floor = earlier["rows"] + rows, floor or earlier.get("floor")
    payload = {"settings": cfg.as_dict(), "floor": floor, "rows": rows}
    (out / "sweep.json").write_text(json.dumps(payload, indent=2))
    plot_sweep(rows, cfg.extractors[0], out / "sweep.png", by="nfe" if cfg.nfe else "steps", floor=floor)
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return rows


def format_row(row: dict) -> str:
    prefixes = ("fid_", "kid_", "precision_", "recall_", "cond_acc")
    keys = [k for k in row if k.startswith(prefixes) and not k.endswith("_std")]
    metrics = "  ".join(f"{k}={row[k]:.4g}" for k in keys)
    seconds = row["sample_seconds_per_1k"] / 1000
    return f"{row['sampler']:>12} {row['steps']:>5} steps {row['nfe']:>5} NFE  {metrics}  {seconds:.4f} s/sample"


def plot_sweep(rows: list[dict], extractor: str, path: Path, by: str = "steps", floor: dict | None = None) -> None:
    """FID (with the real-data floor), conditional accuracy (when there is one) and seconds per sample against
    ``by`` (steps or nfe), one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"fid_{extractor}", f"FID ({extractor}, log scale)", "log")]
    if any("cond_acc" in r for r in rows):
        panels.append(("cond_acc", "conditional accuracy", "linear"))
    panels.append(("seconds", "seconds per sample", "log"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    label = "network evaluations per sample (NFE)" if by == "nfe" else "sampling steps"
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        rs = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r[by])
        xs = [r[by] for r in rs]
        for ax, (key, _, _) in zip(axes, panels):
            ys = [r["sample_seconds_per_1k"] / 1000 if key == "seconds" else r.get(key) for r in rs]
            ax.plot(xs, ys, marker="o", label=sampler)
    if floor is not None and f"fid_{extractor}" in floor:
        axes[0].axhline(floor[f"fid_{extractor}"], color="gray", linestyle="--", label="real data (floor)")
    for ax, (_, title, yscale) in zip(axes, panels):
        ax.set(xscale="log", yscale=yscale, xlabel=label, title=title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""``ddpm sample`` (write samples from a checkpoint) and ``ddpm sweep`` (metrics against the number of steps).

Both load the checkpoint with ``weights_only=True`` (its ``state_dict`` holds the EMA weights).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from ddpm_lightning.callbacks.samples import trajectory_strip
from ddpm_lightning.data.base import to_uint8
from ddpm_lightning.metrics.evaluate import class_of, generate, sample_generator


def load_model(ckpt_path: str | os.PathLike, device: str = "auto"):
    """A DiffusionModule from a checkpoint (EMA weights), loaded with ``weights_only=True``, in eval mode on
    ``device`` (auto: cuda if available). A missing, truncated, corrupt or unsafe file is a one-line ValueError."""
    from ddpm_lightning.checkpointing import checkpoint_load_error
    from ddpm_lightning.module import DiffusionModule

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = DiffusionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:
        known = checkpoint_load_error(path, err)  # truncated, corrupt or unsafe: one line naming the file
        if known is None and not isinstance(err, (TypeError, KeyError)):  # TypeError/KeyError: not a DDPM checkpoint
            raise
        raise (known or ValueError(f"cannot load checkpoint {str(path)!r}: {err}")) from None
    return model.to(device).eval()


def _sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm sample", description="Write samples of a checkpoint as PNG grid, PNGs, npz")
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--out_dir", default="samples")
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--labels", type=int, nargs="*", help="class labels, cycled over the samples (conditional models)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    p.add_argument("--num_steps", type=int, default=50, help="DDIM steps (DDPM always runs all T)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--trajectory_images", type=int, default=8, help="rows of the noise-to-image strip (0: none)")
    p.add_argument("--device", default="auto")
    return p


def sample_command(argv: list[str]) -> Path:
    """``ddpm sample``: grid.png, png/NNNNNN.png, samples.npz (images uint8 NHWC, labels, settings), trajectory.png."""
    args = _sample_parser().parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num_samples and --batch_size must be >= 1")
    model = load_model(args.ckpt_path, args.device)
    indices = list(range(args.num_samples))
    labels = None
    if args.labels:
        labels = [args.labels[i % len(args.labels)] for i in indices]
    elif model.conditional:
        labels = class_of(indices, model.hparams.num_classes).tolist()
    start = time.perf_counter()
    images, labels_t = generate(
        model,
        indices,
        seed=args.seed,
        batch_size=args.batch_size,
        sampler=args.sampler,
        num_steps=args.num_steps,
        eta=args.eta,
        guidance_scale=args.guidance_scale,
        labels=labels,
        progress=True,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out_dir)
    (out / "png").mkdir(parents=True, exist_ok=True)
    floats = images.float() / 255
    nrow = max(1, int(len(indices) ** 0.5))
    save_image(make_grid(floats, nrow=nrow, padding=2, pad_value=1.0), out / "grid.png")
    for i, img in zip(indices, floats):
        save_image(img, out / "png" / f"{i:06d}.png")
    settings = {k: v for k, v in vars(args).items() if k != "device"}
    np.savez_compressed(
        out / "samples.npz",
        images=images.permute(0, 2, 3, 1).numpy(),
        labels=(labels_t.numpy() if labels_t is not None else np.full(len(indices), -1)),
        settings=json.dumps(settings),
    )
    if args.trajectory_images > 0:
        k = min(args.trajectory_images, args.num_samples)
        gens = [sample_generator(args.seed, i, model.device) for i in range(k)]
        y = labels_t[:k] if labels_t is not None else None
        _, traj = model.sample(
            k,
            labels=y,
            sampler=args.sampler,
            num_steps=args.num_steps,
            eta=args.eta,
            guidance_scale=args.guidance_scale,
            generator=gens,
            return_trajectory=True,
        )
        strip = trajectory_strip(traj.float().cpu(), k, 10)
        save_image(
            make_grid(to_uint8(strip).float() / 255, nrow=strip.shape[0] // k, padding=2), out / "trajectory.png"
        )
    print(f"wrote {len(indices)} samples to {out} ({seconds / len(indices):.3f} s/sample)")
    return out


def _datamodule_from_config(config: str, root: str | None):
    """Instantiate the ``data`` section of a YAML config (class_path + init_args), optionally with another root."""
    import importlib

    import yaml

    with open(config) as f:
        data = (yaml.safe_load(f) or {}).get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{config} has no data section with a class_path")
    module, _, name = data["class_path"].rpartition(".")
    init = dict(data.get("init_args") or {})
    if root is not None:
        init.update(root=root, download=False)
    return getattr(importlib.import_module(module), name)(**init)


def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm sweep", description="Sample quality and time per sample vs. sampling steps")
    p.add_argument("--config", required=True, help="the training config (its data section gives the real data)")
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--data_root", default=None, help="override data.root (and turn the download off)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 250, 1000])
    p.add_argument("--samplers", nargs="+", choices=["ddim", "ddpm"], default=["ddim", "ddpm"])
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--extractors", nargs="+", choices=["classifier", "inception"], default=["classifier"])
    p.add_argument("--classifier", default="mnist")
    p.add_argument("--inception_weights", default=None)
    p.add_argument("--out_dir", default="sweep")
    p.add_argument("--device", default="auto")
    return p


def sweep_command(argv: list[str]) -> list[dict]:
    """``ddpm sweep``: for each sampler and step count, FID/KID (and conditional accuracy) and seconds per sample.

    ``ddpm`` at k < T steps is DDIM with eta = 1 on the k-step sub-sequence, which is ancestral DDPM sampling of the
    respaced chain (Song et al. 2021, sec. 4.1); at k = T it is exactly DDPM (Ho et al. 2020, Algorithm 2).
    """
    from ddpm_lightning.callbacks.metrics import SampleMetrics

    args = _sweep_parser().parse_args(argv)
    model = load_model(args.ckpt_path, args.device)
    datamodule = _datamodule_from_config(args.config, args.data_root)
    T = model.diffusion.num_timesteps
    rows = []
    for sampler in args.samplers:
        for steps in sorted(set(min(s, T) for s in args.steps)):
            full_ddpm = sampler == "ddpm" and steps == T
            metric = SampleMetrics(
                num_samples=args.num_samples,
                sampler="ddpm" if full_ddpm else "ddim",
                num_steps=steps,
                eta=1.0 if sampler == "ddpm" else 0.0,
                guidance_scale=args.guidance_scale,
                seed=args.seed,
                batch_size=args.batch_size,
                extractors=args.extractors,
                classifier=args.classifier,
                inception_weights=args.inception_weights,
            )
            res = metric.compute(model, datamodule, progress=True)
            rows.append({"sampler": sampler, "steps": steps, **res})
            print(_format_row(rows[-1]), flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    _plot_sweep(rows, args.extractors[0], out / "sweep.png")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return rows


def _format_row(row: dict) -> str:
    keys = [k for k in row if k.startswith(("fid_", "kid_", "cond_acc")) and not k.endswith("_std")]
    metrics = "  ".join(f"{k}={row[k]:.4g}" for k in keys)
    return f"{row['sampler']:>5} {row['steps']:>5} steps  {metrics}  {row['sample_seconds_per_1k'] / 1000:.4f} s/sample"


def _plot_sweep(rows: list[dict], extractor: str, path: Path) -> None:
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

"""``ddpm sample``: write samples of a checkpoint as a grid, PNGs, an .npz and a noise-to-image trajectory.

    ddpm sample --ckpt_path CKPT --num_samples 64 --sampler ddim --num_steps 50
    ddpm sample --config configs/mnist_conditional.yaml --ckpt_path CKPT --labels 3 --guidance_scale 3

The checkpoint is loaded with ``weights_only=True`` (its ``state_dict`` holds the EMA weights).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from jsonargparse import ArgumentParser, Namespace

from ddpm_lightning.commands.base import add_sampling_arguments, recipe_sampling, sampling_from
from ddpm_lightning.images import grid, save_png, trajectory_grid
from ddpm_lightning.metrics.evaluate import class_of, generate, sample_generator
from ddpm_lightning.module import DiffusionModule

DESCRIPTION = "Write samples of a checkpoint: grid.png, png/NNNNNN.png, samples.npz and trajectory.png."


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by `ddpm fit`")
    parser.add_argument("--out_dir", type=str, default="samples")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--labels", type=int, nargs="*", default=None, help="class labels, cycled over the samples")
    parser.add_argument("--seed", type=int, default=0, help="sample i draws from the generator of (seed, i)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--trajectory_images", type=int, default=8, help="rows of the noise-to-image strip (0: none)")
    parser.add_argument("--device", type=str, default="auto", help="torch device; auto = cuda if available")
    add_sampling_arguments(parser)


def from_recipe(recipe: dict[str, Any], path: str) -> dict[str, Any]:
    """A recipe gives the sampling settings (``model.sampling``)."""
    return recipe_sampling(recipe)


def run(cfg: Namespace) -> Path:
    if cfg.num_samples < 1 or cfg.batch_size < 1 or cfg.trajectory_images < 0:
        raise ValueError("--num_samples and --batch_size must be >= 1, --trajectory_images >= 0")
    model = DiffusionModule.from_checkpoint(cfg.ckpt_path, cfg.device)
    sampling = sampling_from(cfg, model.sampling)
    indices = list(range(cfg.num_samples))
    labels = None
    if cfg.labels:
        if not model.conditional:
            raise ValueError("--labels given, but this model is unconditional")
        num_classes = model.hparams.num_classes
        if not all(0 <= label < num_classes for label in cfg.labels):
            raise ValueError(f"--labels must be in [0, {num_classes - 1}], got {cfg.labels}")
        labels = [cfg.labels[i % len(cfg.labels)] for i in indices]
    elif model.conditional:
        labels = class_of(indices, model.hparams.num_classes).tolist()
    start = time.perf_counter()
    images, labels_t = generate(
        model, indices, sampling=sampling, seed=cfg.seed, batch_size=cfg.batch_size, labels=labels, progress=True
    )
    seconds = time.perf_counter() - start
    out = Path(cfg.out_dir)
    save_png(grid(images), out / "grid.png")
    for i, image in zip(indices, images):
        save_png(image, out / "png" / f"{i:06d}.png")
    settings = {k: v for k, v in cfg.as_dict().items() if k != "device"} | {"sampling": sampling.to_dict()}
    np.savez_compressed(
        out / "samples.npz",
        images=images.permute(0, 2, 3, 1).numpy(),
        labels=(labels_t.numpy() if labels_t is not None else np.full(len(indices), -1)),
        settings=json.dumps(settings),
    )
    if cfg.trajectory_images > 0:
        k = min(cfg.trajectory_images, cfg.num_samples)
        gens = [sample_generator(cfg.seed, i, model.device) for i in range(k)]
        y = labels_t[:k] if labels_t is not None else None
        _, traj = model.sample(k, labels=y, sampling=sampling, generator=gens, return_trajectory=True)
        save_png(trajectory_grid(traj, k, 10), out / "trajectory.png")
    nfe = sampling.nfe(model.diffusion.num_timesteps, model.conditional)
    print(f"wrote {len(indices)} samples to {out} ({seconds / len(indices):.3f} s/sample, {nfe} NFE/sample)")
    return out

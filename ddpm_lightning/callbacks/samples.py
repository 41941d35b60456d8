"""Sample grids and denoising trajectories during training, logged to the logger and saved as PNG.

Sampling uses the EMA weights when an :class:`~ddpm_lightning.callbacks.ema.EMA` callback is present, a fixed seed
(the same noise every time, so successive grids show the model changing, not the draw), and runs on rank zero
only: a grid is a small, fixed cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image

from ddpm_lightning.callbacks.ema import ema_weights
from ddpm_lightning.samplers import SAMPLERS


def run_dir(trainer: L.Trainer) -> Path:
    """Folder of this run, where the PNGs go: the logger's ``log_dir`` for TensorBoard and CSV
    (``<save_dir>/<name>/version_N``); for other loggers ``<save_dir>/<name>/<version>``, beside the checkpoints
    that :class:`~lightning.pytorch.callbacks.ModelCheckpoint` puts there (W&B: ``<save_dir>/<project>/<run id>``,
    where ``trainer.log_dir`` would be the bare ``save_dir``); ``default_root_dir`` without a logger.

    Unlike ``trainer.log_dir`` it broadcasts nothing, so it is safe on rank zero alone.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return Path(logger.log_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


def trajectory_strip(trajectory: Tensor, num_images: int, num_frames: int) -> Tensor:
    """Pick ``num_frames`` evenly spaced steps of the first ``num_images`` trajectories.

    trajectory: (S + 1, N, C, H, W) from x_T to x_0. Returns (num_images * num_frames, C, H, W), row-major: one row
    per image, noise on the left, the sample on the right.
    """
    steps = trajectory.shape[0]
    idx = torch.linspace(0, steps - 1, min(num_frames, steps)).round().long()
    frames = trajectory[idx, :num_images]  # (F, n, C, H, W)
    return frames.transpose(0, 1).reshape(-1, *trajectory.shape[2:])


class SampleGrid(Callback):
    """Every ``every_n_epochs`` epochs, sample a grid (one row per class when conditional) and a trajectory strip.

    Args:
        every_n_epochs: sampling period in epochs (the grid is also drawn after the last epoch).
        num_samples: images in the grid of an unconditional model.
        samples_per_class: images per row (one row per class) of a conditional model.
        sampler: ``ddpm`` (all T steps) or ``ddim``.
        num_steps: DDIM steps.
        eta: DDIM stochasticity.
        guidance_scale: classifier-free guidance scale for conditional models.
        seed: seed of the sampling noise; fixed so grids are comparable across epochs.
        trajectory_images: rows of the denoising-trajectory strip (0 disables it).
        trajectory_frames: columns (steps shown) of the strip.
        save_png: also write ``samples/epoch=NNN.png`` (and ``trajectory_epoch=NNN.png``) in the log dir.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        samples_per_class: int = 8,
        sampler: Literal["ddpm", "ddim"] = "ddim",
        num_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        seed: int = 0,
        trajectory_images: int = 4,
        trajectory_frames: int = 10,
        save_png: bool = True,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if every_n_epochs < 1 or num_samples < 1 or samples_per_class < 1:
            raise ValueError("every_n_epochs, num_samples and samples_per_class must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.samples_per_class = samples_per_class
        self.sampler = sampler
        self.num_steps = num_steps
        self.eta = eta
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.trajectory_images = trajectory_images
        self.trajectory_frames = trajectory_frames
        self.save_png = save_png
        self.last_grid_path: Path | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1  # epochs completed
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last or trainer.should_stop

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._due(trainer):
            return
        self.log_samples(trainer, pl_module)

    @rank_zero_only
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample with the EMA weights and log the grid and the trajectory strip."""
        if pl_module.conditional:
            num_classes = pl_module.hparams.num_classes
            labels = torch.arange(num_classes).repeat_interleave(self.samples_per_class)
            nrow = self.samples_per_class
        else:
            labels, nrow = None, int(self.num_samples**0.5) or 1
        n = len(labels) if labels is not None else self.num_samples
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        want_trajectory = self.trajectory_images > 0
        with ema_weights(trainer, pl_module):
            out = pl_module.sample(
                n,
                labels=labels,
                sampler=self.sampler,
                num_steps=self.num_steps,
                eta=self.eta,
                guidance_scale=self.guidance_scale,
                generator=gen,
                return_trajectory=want_trajectory,
            )
        images, trajectory = out if want_trajectory else (out, None)
        grid = make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=2, pad_value=1.0).clamp(0, 1)
        self._emit(trainer, "samples/grid", grid, f"epoch={trainer.current_epoch:03d}.png")
        if trajectory is not None:
            k = min(self.trajectory_images, n)
            strip = trajectory_strip(trajectory.float().cpu(), k, self.trajectory_frames)
            frames = strip.shape[0] // k
            tgrid = make_grid((strip + 1) / 2, nrow=frames, padding=2, pad_value=1.0).clamp(0, 1)
            self._emit(trainer, "samples/trajectory", tgrid, f"trajectory_epoch={trainer.current_epoch:03d}.png")

    def _emit(self, trainer: L.Trainer, tag: str, grid: Tensor, filename: str) -> None:
        """Send a (3, H, W) image in [0, 1] to every logger that takes images, and save it as PNG.

        TensorBoard gets ``add_image``, W&B ``log_image`` (stored in its run folder); CSV holds no images, so with a
        CSV logger the PNG in the run folder is written even when ``save_png`` is off: it is that logger's image.
        """
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=tag, images=[grid], step=trainer.global_step)
                continue
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
                experiment.add_image(tag, grid, global_step=trainer.global_step)
        if self.save_png or any(isinstance(logger, CSVLogger) for logger in trainer.loggers):
            out = run_dir(trainer) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            path = out / filename
            save_image(grid, path)
            if tag == "samples/grid":
                self.last_grid_path = path

"""Sample grids and denoising trajectories during training, logged to the logger and saved as PNG.

Sampling uses the EMA weights when an :class:`~ddpm_lightning.callbacks.ema.EMA` callback is present, a fixed seed
(the same noise every time, so successive grids show the model changing, not the draw), and runs on rank zero
only: a grid is a small, fixed cost.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from ddpm_lightning.callbacks.ema import ema_weights
from ddpm_lightning.images import grid, save_png, trajectory_grid
from ddpm_lightning.sampling import DEFAULT_SAMPLING, SamplingConfig, check_runs


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


class SampleGrid(Callback):
    """Every ``every_n_epochs`` epochs, sample a grid (one row per class when conditional) and a trajectory strip.

    Args:
        every_n_epochs: sampling period in epochs (the grid is also drawn after the last epoch).
        num_samples: images in the grid of an unconditional model.
        samples_per_class: images per row (one row per class) of a conditional model.
        sampling: how to sample (sampler, steps, guidance, ...: :class:`~ddpm_lightning.sampling.SamplingConfig`).
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
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        seed: int = 0,
        trajectory_images: int = 4,
        trajectory_frames: int = 10,
        save_png: bool = True,
    ) -> None:
        if every_n_epochs < 1 or num_samples < 1 or samples_per_class < 1:
            raise ValueError("every_n_epochs, num_samples and samples_per_class must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.samples_per_class = samples_per_class
        self.sampling = SamplingConfig.of(sampling)
        self.seed = seed
        self.trajectory_images = trajectory_images
        self.trajectory_frames = trajectory_frames
        self.save_png = save_png
        self.last_grid_path: Path | None = None
        self._rows_named = False  # the class of each grid row is logged once per run

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # a setting the model cannot sample with stops the run now, not after its first epoch
            check_runs(self.sampling, pl_module.diffusion)

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
                n, labels=labels, sampling=self.sampling, generator=gen, return_trajectory=want_trajectory
            )
        images, trajectory = out if want_trajectory else (out, None)
        if pl_module.conditional and not self._rows_named:
            self._name_rows(trainer, pl_module.hparams.num_classes)
        self._emit(trainer, "samples/grid", grid(images, nrow), f"epoch={trainer.current_epoch:03d}.png")
        if trajectory is not None:
            strip = trajectory_grid(trajectory, self.trajectory_images, self.trajectory_frames)
            self._emit(trainer, "samples/trajectory", strip, f"trajectory_epoch={trainer.current_epoch:03d}.png")

    def _name_rows(self, trainer: L.Trainer, num_classes: int) -> None:
        """Once per run: which class each grid row shows, from the DataModule's ``classes`` (e.g. a Hugging Face
        ClassLabel's names), as TensorBoard text ``samples/grid_rows`` and ``samples/grid_rows.txt``."""
        self._rows_named = True
        names = list(getattr(trainer.datamodule, "classes", None) or [])
        if len(names) != num_classes:
            return
        rows = [f"row {i}: {name}" for i, name in enumerate(names)]
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard's SummaryWriter
                experiment.add_text("samples/grid_rows", "  \n".join(rows), global_step=trainer.global_step)
        out = run_dir(trainer) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        (out / "grid_rows.txt").write_text("\n".join(rows) + "\n")

    def _emit(self, trainer: L.Trainer, tag: str, image: Tensor, filename: str) -> None:
        """Send a (3, H, W) uint8 image to every logger that takes images, and save it as PNG.

        TensorBoard gets ``add_image``, W&B ``log_image`` (stored in its run folder); CSV holds no images, so with a
        CSV logger the PNG in the run folder is written even when ``save_png`` is off: it is that logger's image.
        """
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=tag, images=[image], step=trainer.global_step)
                continue
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
                experiment.add_image(tag, image, global_step=trainer.global_step)
        if self.save_png or any(isinstance(logger, CSVLogger) for logger in trainer.loggers):
            out = run_dir(trainer) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            path = out / filename
            save_png(image, path)
            if tag == "samples/grid":
                self.last_grid_path = path

"""Callbacks: EMA of the weights, sample grids and denoising trajectories, the effective batch size, the progress bar
of terminals and batch jobs."""

from ddpm_lightning.callbacks.batch_size import EffectiveBatchSize
from ddpm_lightning.callbacks.ema import EMA, ema_weights
from ddpm_lightning.callbacks.progress import ProgressBar
from ddpm_lightning.callbacks.samples import SampleGrid

__all__ = ["EMA", "EffectiveBatchSize", "ProgressBar", "SampleGrid", "ema_weights"]

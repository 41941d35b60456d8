"""Callbacks: EMA of the weights (and the power-function EMAs of post-hoc EMA), sample grids and denoising
trajectories, the effective batch size, the progress bar of terminals and batch jobs."""

from ddpm_lightning.callbacks.batch_size import EffectiveBatchSize
from ddpm_lightning.callbacks.ema import EMA, ema_weights
from ddpm_lightning.callbacks.phema import PostHocEMA
from ddpm_lightning.callbacks.progress import ProgressBar
from ddpm_lightning.callbacks.samples import SampleGrid

__all__ = ["EMA", "EffectiveBatchSize", "PostHocEMA", "ProgressBar", "SampleGrid", "ema_weights"]

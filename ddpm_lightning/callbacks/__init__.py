"""Callbacks: EMA of the weights, sample grids and denoising trajectories, the progress bar of terminals and batch
jobs."""

from ddpm_lightning.callbacks.ema import EMA, ema_weights
from ddpm_lightning.callbacks.progress import ProgressBar
from ddpm_lightning.callbacks.samples import SampleGrid

__all__ = ["EMA", "ProgressBar", "SampleGrid", "ema_weights"]

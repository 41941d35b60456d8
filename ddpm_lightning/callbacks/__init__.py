"""Callbacks: EMA of the weights, sample grids and denoising trajectories."""

from ddpm_lightning.callbacks.ema import EMA, ema_weights
from ddpm_lightning.callbacks.samples import SampleGrid

__all__ = ["EMA", "SampleGrid", "ema_weights"]

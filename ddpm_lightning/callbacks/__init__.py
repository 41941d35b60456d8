"""Callbacks: EMA of the weights, sample grids and denoising trajectories, the effective batch size."""

from ddpm_lightning.callbacks.batch_size import EffectiveBatchSize
from ddpm_lightning.callbacks.ema import EMA, ema_weights
from ddpm_lightning.callbacks.samples import SampleGrid

__all__ = ["EMA", "EffectiveBatchSize", "SampleGrid", "ema_weights"]

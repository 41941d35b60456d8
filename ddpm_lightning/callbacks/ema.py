"""Exponential moving average of the weights, on top of Lightning's own :class:`WeightAveraging`.

Lightning's callback already keeps an :class:`~torch.optim.swa_utils.AveragedModel`, swaps the averaged weights in
for validation, writes them to the checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``) and
restores both on resume. What this subclass adds:

* the decay warm-up of Ho et al.'s and improved-diffusion's EMA, ``decay_n = min(decay, (1 + n) / (10 + n))``
  after ``n`` updates, so that early averages are not dominated by the random initialisation;
* or, with ``sigma_rel``, the power-function EMA of Karras et al. 2024 (eq. 3), ``decay_t = (1 - 1/t)^(gamma + 1)``
  at update ``t``: an average whose length is a fixed fraction of the training so far, right wherever the run
  stops (15 minutes or 15 hours); ``ddpm phema`` picks that fraction after training;
* a foreach ``lerp`` update (one kernel launch per group of tensors instead of one per parameter);
* :meth:`averaged_weights`, a context manager that puts the EMA weights into the module for sampling callbacks and
  is a no-op when they are already there (during validation).

A checkpoint written with this callback holds the EMA weights in ``state_dict``, so
``DiffusionModule.load_from_checkpoint(path)`` samples from the EMA model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from ddpm_lightning.phema import power_beta, sigma_rel_to_gamma


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """Decay used for update number ``num_updates`` (0-based count of earlier averaged updates)."""
    if not warmup:
        return decay
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class EMA(WeightAveraging):
    """EMA of the model weights, used for validation, sample grids and the checkpoint's ``state_dict``.

    Args:
        decay: the EMA decay (0.9999 in the DDPM paper; 0.995–0.999 for short runs).
        warmup: ramp the decay up as ``(1 + n) / (10 + n)`` over the first updates.
        update_every_n_steps: average after every n-th optimizer step.
        start_step: first optimizer step (0-based) that is averaged; before it the average tracks nothing.
        sigma_rel: the power-function EMA of this relative length (std of the averaging profile / training length
            so far, in (0, 0.2887); Karras et al. use 0.05–0.15). When given it replaces ``decay`` and ``warmup``
            (so that a config setting it overrides a recipe's decay).
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        sigma_rel: float | None = None,
    ) -> None:
        self.gamma = None if sigma_rel is None else sigma_rel_to_gamma(sigma_rel)  # a bad sigma_rel errs here
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay = decay
        self.sigma_rel = sigma_rel
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        super().__init__(use_buffers=True, multi_avg_fn=self.multi_avg)
        self._swapped_in = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's set-up (it deep-copies the module into an AveragedModel), leaving out of the copy the
        attributes the module names in ``not_averaged`` (e.g. optimizer factories, which the copy never uses and
        which may hold references that cannot be copied)."""
        names = [n for n in getattr(pl_module, "not_averaged", ()) if n in pl_module.__dict__]
        held = {n: pl_module.__dict__.pop(n) for n in names}
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            pl_module.__dict__.update(held)

    def multi_avg(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        if self.gamma is not None:  # update t = num_averaged + 1 (the first update, t = 1, copied the weights)
            d = power_beta(self.gamma, int(num_averaged) + 1)
        else:
            d = ema_decay(self.decay, int(num_averaged), self.warmup)
        float_avg = [a for a in averaged if a.is_floating_point()]
        float_cur = [c for a, c in zip(averaged, current) if a.is_floating_point()]
        # avg <- avg + (1 - d) (cur - avg), the EMA update, as one foreach kernel
        torch._foreach_lerp_(float_avg, float_cur, 1.0 - d)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        return step_idx >= self.start_step and step_idx % self.update_every_n_steps == 0

    def _swap_models(self, pl_module: L.LightningModule) -> None:
        super()._swap_models(pl_module)
        self._swapped_in = not self._swapped_in

    @contextmanager
    def averaged_weights(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Run the body with the EMA weights in ``pl_module`` (no-op outside fit or when already swapped in)."""
        if self._average_model is None or self._swapped_in:
            yield
            return
        self._swap_models(pl_module)
        try:
            yield
        finally:
            self._swap_models(pl_module)


def ema_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> AbstractContextManager[None]:
    """Context putting the EMA weights in place if the trainer has an :class:`EMA` callback, else a no-op."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA):
            return cb.averaged_weights(pl_module)
    return nullcontext()

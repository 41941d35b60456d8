"""Log the effective batch size once per fit: per-device batch x gradient accumulation x devices."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class EffectiveBatchSize(Callback):
    """At the first training batch of each fit, say and log (``train/effective_batch_size``) the batch the optimizer
    sees; direct to the loggers, since not every step logs. The CLI adds it to every run."""

    def __init__(self) -> None:
        self._pending = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending:
            return
        self._pending = False
        per_device, accumulate, world = batch[0].shape[0], trainer.accumulate_grad_batches, trainer.world_size
        effective = per_device * accumulate * world
        rank_zero_info(
            f"effective batch size {effective} = {per_device} per device x {accumulate} accumulated x {world} devices"
        )
        for logger in trainer.loggers:
            logger.log_metrics({"train/effective_batch_size": effective}, step=trainer.global_step)

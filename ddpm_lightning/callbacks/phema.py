"""The post-hoc EMA callback: power-function EMAs of the weights and their snapshots on disk (Karras et al. 2024).

It works beside :class:`~ddpm_lightning.callbacks.EMA` (which keeps the one EMA used for validation, grids and the
checkpoint's ``state_dict``): this one keeps, for each ``sigma_rel``, the power-function EMA of the *training* weights
and writes all of them every ``every_n_steps`` optimizer steps (and at the end of training) to
``<checkpoint dir>/phema/phema-NNNNNNN.pt``. ``ddpm phema`` then reconstructs the EMA of any length from those
snapshots (:mod:`ddpm_lightning.phema`). The EMAs in progress are part of every checkpoint, so a resumed run goes on
exactly; under DDP every rank keeps them (they are identical) and rank 0 writes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ddpm_lightning.checkpointing import AtomicCheckpointIO
from ddpm_lightning.phema import DEFAULT_SIGMA_RELS, power_beta, sigma_rel_to_gamma

SNAPSHOT_DIR = "phema"


def snapshot_name(step: int) -> str:
    return f"phema-{step:07d}.pt"


class PostHocEMA(L.Callback):
    """Power-function EMAs of the weights and their snapshots, for ``ddpm phema``.

    Args:
        sigma_rels: relative standard deviations of the EMAs kept (Karras et al. 2024 keep 0.05 and 0.10).
        every_n_steps: write a snapshot of every EMA each this many optimizer steps (a reconstruction is as good as
            the snapshots are dense: Karras et al. keep one per 2-5 % of training).
        dirpath: where snapshots go (default: ``phema/`` in the ModelCheckpoint's folder, else in the log dir).
    """

    def __init__(
        self, sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS, every_n_steps: int = 100, dirpath: str | None = None
    ) -> None:
        if not sigma_rels:
            raise ValueError("PostHocEMA needs at least one sigma_rel")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]  # a bad sigma_rel is an error here
        self.every_n_steps = every_n_steps
        self.dirpath = dirpath
        self._names: list[str] = []
        self._sources: list[Tensor] = []
        self._emas: list[list[Tensor]] = []
        self._step = 0  # optimizer steps averaged so far
        self._restored: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return f"PostHocEMA{{sigma_rels={self.sigma_rels}}}"

    # -- averaging ---------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = pl_module.state_dict(keep_vars=True)  # the live parameters and buffers, as the checkpoint names them
        self._names = [k for k, v in state.items() if v.is_floating_point()]
        self._sources = [state[k] for k in self._names]
        if self._restored is not None:
            saved = self._restored
            self._restored = None
            if saved["names"] != self._names:
                raise ValueError("the checkpoint's post-hoc EMA holds other tensors than this model's")
            self._step = int(saved["step"])
            self._emas = [[t.to(s.device, copy=True) for t, s in zip(ema, self._sources)] for ema in saved["emas"]]
        elif not self._emas:
            self._emas = [[s.detach().clone() for s in self._sources] for _ in self.sigma_rels]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps done; gradient accumulation repeats a step: average it once
        if step <= self._step:
            return
        self._step = step
        current = [s.detach() for s in self._sources]
        for gamma, ema in zip(self.gammas, self._emas):
            # ema <- beta ema + (1 - beta) theta (Karras et al. 2024, eq. 3); beta = 0 at step 1
            torch._foreach_lerp_(ema, current, 1.0 - power_beta(gamma, step))
        if step % self.every_n_steps == 0:
            self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._step and not self._path(trainer, self._step).is_file():
            self._write(trainer)  # the final step, wherever the run stopped

    # -- snapshots -----------------------------------------------------------------------------------------------
    def snapshot_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        base = getattr(ckpt, "dirpath", None) or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints"
        )
        return Path(base) / SNAPSHOT_DIR

    def _path(self, trainer: L.Trainer, step: int) -> Path:
        return self.snapshot_dir(trainer) / snapshot_name(step)

    def _write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        path = self._path(trainer, self._step)
        blob = {
            "step": self._step,
            "sigma_rels": self.sigma_rels,
            "gammas": self.gammas,
            "states": [{n: t.detach().to("cpu", copy=True) for n, t in zip(self._names, ema)} for ema in self._emas],
        }
        AtomicCheckpointIO().save_checkpoint(blob, path)  # a killed run never leaves half a snapshot
        if self._step == self.every_n_steps:
            rank_zero_info(f"post-hoc EMA snapshots (sigma_rel {self.sigma_rels}) go to {path.parent}")

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "names": list(self._names),
            "emas": [[t.detach().to("cpu", copy=True) for t in ema] for ema in self._emas],  # a copy, never a view
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict  # put in place at train start, when the module's tensors are known

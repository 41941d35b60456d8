"""The progress bar: Lightning's rich bar in a terminal, plain log lines in a batch job.

A SLURM job's ``.out`` file (or any redirected stdout) cannot show a live bar: the rich bar's redraws turn into a
wrapped mess at the end of the file. When stdout is not a terminal, :class:`ProgressBar` prints instead, on rank
zero only, one flushed line every ``every_n_seconds`` of wall time (or every ``every_n_steps`` optimizer steps):

    epoch 1/20 step 450/8400 loss 0.0412 val/loss 0.0398 38.2 img/s ETA 1:02:13 (max_epochs)

* ``epoch E/N``: 1-based epoch of ``max_epochs`` (``?`` when unbounded); ``step S/T``: optimizer steps done, of the
  trainer's estimate of all steps (``max_steps``, epochs x batches, accumulation);
* ``loss``: the mean of the logged ``train/loss`` (already averaged over ranks) over the steps since the last line;
* ``val/loss``: the latest validation loss, once there is one; a line is also printed right after each validation
  whose loss differs from the one shown last;
* ``img/s``: training images per second over all ranks (rank zero's batch x world size), since the last line,
  validation time left out; ``mem``: peak CUDA memory of rank zero (GPU runs only);
* ``ETA``: the time left until the first limit that ends the run, and which: ``max_steps`` or ``max_epochs``
  (the remaining steps at the average step time of this run so far, validation included, so it is honest for long
  runs) or ``max_time`` (the Timer's remaining time), e.g. ``ETA 0:12:40 (max_time)``.

A last line is printed when training ends, unless the last step's line was just printed. In a terminal, or with
``plain: false``, it is exactly Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar`.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, Timer
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from torch import Tensor

#: the metrics the plain lines show (the names DiffusionModule and ClassifierModule log)
TRAIN_LOSS, VAL_LOSS = "train/loss", "val/loss"


class ProgressBar(RichProgressBar):
    """Rich progress bar on a TTY, plain periodic lines otherwise (see the module docstring for the format).

    Args:
        every_n_seconds: in plain mode, a line at the first optimizer step at least this long after the last line.
        every_n_steps: in plain mode, a line every n optimizer steps instead (``every_n_seconds`` is then unused).
        plain: force plain lines (True) or the rich bar (False); None picks plain when ``sys.stdout`` is not a TTY.
        refresh_rate, leave, theme, console_kwargs: the rich bar's, unchanged.
    """

    def __init__(
        self,
        every_n_seconds: float = 30.0,
        every_n_steps: int | None = None,
        plain: bool | None = None,
        refresh_rate: int = 100,
        leave: bool = False,
        theme: RichProgressBarTheme = RichProgressBarTheme(),  # noqa: B008 (Lightning's own default)
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not every_n_seconds > 0:
            raise ValueError(f"every_n_seconds must be > 0, got {every_n_seconds}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be None or >= 1, got {every_n_steps}")
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme, console_kwargs=console_kwargs)
        self.every_n_seconds = every_n_seconds
        self.every_n_steps = every_n_steps
        self.plain = not _isatty(sys.stdout) if plain is None else plain
        self._reset_window(time.monotonic())
        self._start_time = self._last_line_time = time.monotonic()
        self._start_step = 0
        self._last_step_shown = self._seen_step = -1
        self._last_loss: float | None = None
        self._last_rate: float | None = None
        self._val_shown: float | None = None

    @property
    def is_enabled(self) -> bool:
        # the rich machinery of the parent checks this everywhere: in plain mode it draws nothing
        return not self.plain and super().is_enabled

    @property
    def _plain_on(self) -> bool:
        # disable() is how Lightning silences the bar on ranks other than zero (and in the tuner)
        return self.plain and self._enabled

    # -- plain mode: collect ---------------------------------------------------------------------------------------
    def _reset_window(self, now: float) -> None:
        self._window_images = 0
        self._window_seconds = 0.0
        self._window_loss: Tensor | None = None
        self._window_steps = 0
        self._tick = now

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        now = time.monotonic()
        self._start_time = self._last_line_time = now
        # a resumed run starts past step 0
        self._start_step = self._last_step_shown = self._seen_step = trainer.global_step
        self._reset_window(now)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._tick = time.monotonic()  # what ran between epochs (sample grids, checkpoints) is not training

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._plain_on:
            return
        now = time.monotonic()
        self._window_seconds += now - self._tick
        self._tick = now
        self._window_images += _batch_size(batch) * trainer.world_size
        step = trainer.global_step
        if step == self._seen_step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self._seen_step = step
        loss = trainer.callback_metrics.get(f"{TRAIN_LOSS}_step", trainer.callback_metrics.get(TRAIN_LOSS))
        if isinstance(loss, Tensor):  # summed on its device: no host sync until a line is printed
            loss = loss.detach().float()
            self._window_loss = loss if self._window_loss is None else self._window_loss + loss
        self._window_steps += 1
        if self._line_due(step, now):
            self._print_line(trainer)

    def _line_due(self, step: int, now: float) -> bool:
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        return now - self._last_line_time >= self.every_n_seconds

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._plain_on or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._tick = time.monotonic()  # validation time is not counted in img/s
        val = _as_float(trainer.callback_metrics.get(VAL_LOSS))
        if val is not None and val != self._val_shown:
            self._print_line(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._plain_on and trainer.global_step != self._last_step_shown:
            self._print_line(trainer)

    # -- plain mode: print -----------------------------------------------------------------------------------------
    def _print_line(self, trainer: L.Trainer) -> None:
        now = time.monotonic()
        if self._window_steps:
            if self._window_loss is not None:
                self._last_loss = float(self._window_loss) / self._window_steps
            if self._window_seconds > 0:
                self._last_rate = self._window_images / self._window_seconds
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        parts = [f"epoch {trainer.current_epoch + 1}/{max_epochs}", f"step {step}/{_count(total)}"]
        if self._last_loss is not None:
            parts.append(f"loss {self._last_loss:.4f}")
        val = _as_float(trainer.callback_metrics.get(VAL_LOSS))
        if val is not None:
            parts.append(f"{VAL_LOSS} {val:.4f}")
            self._val_shown = val
        if self._last_rate is not None:
            parts.append(f"{self._last_rate:.1f} img/s")
        device = trainer.strategy.root_device
        if device.type == "cuda":
            parts.append(f"mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        parts.append(f"ETA {self._eta(trainer, step, total, now)}")
        print(" ".join(parts), flush=True)
        self._last_step_shown, self._last_line_time = step, now
        self._reset_window(now)

    def _eta(self, trainer: L.Trainer, step: int, total: float, now: float) -> str:
        """Time left until the first limit that ends the run, and its name: ``0:12:40 (max_time)``; ``?`` unknown."""
        done = step - self._start_step
        limits: list[tuple[float, str]] = []
        if done > 0 and math.isfinite(total):
            by_steps = trainer.max_steps not in (None, -1) and total == trainer.max_steps
            seconds = (now - self._start_time) / done * max(total - step, 0)
            limits.append((seconds, "max_steps" if by_steps else "max_epochs"))
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        if timer is not None and (remaining := timer.time_remaining()) is not None:
            limits.append((max(remaining, 0.0), "max_time"))
        if not limits:
            return "?"
        seconds, limit = min(limits)
        return f"{datetime.timedelta(seconds=round(seconds))} ({limit})"

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.plain:
            print(*args, **kwargs, flush=True)
        else:
            super().print(*args, **kwargs)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _batch_size(batch: Any) -> int:
    """Images in a batch: the first dimension of its first tensor (``(images, labels)`` or a bare tensor)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


def _as_float(value: Any) -> float | None:
    if isinstance(value, Tensor):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None


def _count(total: float) -> str:
    return str(int(total)) if math.isfinite(total) else "?"

"""Checkpoint files: written atomically, read with one clear error, and ``--ckpt_path last`` found across runs.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target's own directory, fsyncs it
  and ``os.replace()``-s it over the target, so a kill at any moment leaves the previous ``last.ckpt`` or the new
  one, never a torn file. (Lightning's own save goes through an fsspec transaction whose temporary file lives in
  ``/tmp``: when ``/tmp`` and the checkpoint folder are different file systems, the usual case on a cluster, the
  final move is a copy into ``last.ckpt`` that a kill can cut short.) Reading, it turns a truncated, corrupt or
  unsafe file into :class:`CheckpointLoadError`, one line naming the file.
* :func:`find_last_checkpoint` resolves ``--ckpt_path last`` over every run of the logger (``version_*``) and the
  SLURM requeue checkpoints (``hpc_ckpt_N.ckpt``); Lightning's own ``"last"`` only looks into the folder of the new
  run, which a fresh logger version leaves empty, and then silently starts from scratch.
* :func:`rng_states` / :func:`set_rng_states` capture and restore the global torch generators, so the ``t`` and
  noise draws after a resume are the ones the uninterrupted run would have made; :class:`ExactResume` is the
  callback that does it at the right moments.
* :class:`FinalCheckpoint` writes ``last.ckpt`` at the last completed step whenever training stops: ``max_steps``
  or ``max_time`` mid-epoch, early stopping, SIGTERM (with or without SLURM's requeue), Ctrl-C; and names it in
  the closing log line.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import signal
import struct
import threading
import uuid
import zipfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

#: errors torch.load raises for a file that is not a whole checkpoint (truncated zip, empty file, random bytes)
_UNREADABLE = (RuntimeError, EOFError, KeyError, ValueError, OSError, pickle.UnpicklingError, struct.error)
#: ... except these, which are about the path, not the bytes, and keep their own message
_NOT_ABOUT_CONTENT = (FileNotFoundError, IsADirectoryError, PermissionError)


class CheckpointLoadError(ValueError):
    """A checkpoint file is truncated, corrupt, or holds objects that ``weights_only=True`` refuses to unpickle."""


#: the paragraphs of torch's "Weights only load failed" message that are advice, not the reason
_TORCH_ADVICE = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation")


def _weights_only_reason(err: BaseException) -> str | None:
    """The reason inside torch's multi-paragraph "Weights only load failed" message, in one line; else None."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    if "WeightsUnpickler error:" in text:  # the reason follows this marker (same line or the next non-empty one)
        lines = text.partition("WeightsUnpickler error:")[2].splitlines()
    else:  # e.g. a legacy (non-zip) torch file: "Trying to load unsupported GLOBAL posix.system ..."
        lines = [line for line in text.splitlines() if not line.strip().startswith(_TORCH_ADVICE)]
    reason = next((line.strip() for line in lines if line.strip()), "")
    reason = reason.split(". Please use")[0].rstrip(".")  # drop torch's advice to allowlist the global
    return reason or "not a checkpoint of tensors and plain values"


def _first_sentence(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


def checkpoint_load_error(path: _PATH, err: BaseException) -> CheckpointLoadError | None:
    """The one-line error for a file ``torch.load(weights_only=True)`` cannot or must not read; None for others.

    A whole file that the weights-only unpickler refuses (pickled functions or classes, a plain pickle, opcodes it
    does not run) is named for what it is, not as corrupt: it holds objects other than tensors and plain values.
    """
    if not isinstance(err, _UNREADABLE) or isinstance(err, _NOT_ABOUT_CONTENT):
        return None
    unsafe = _weights_only_reason(err)
    if unsafe is not None and (not unsafe.startswith("Unsupported operand") or _whole_pickle(path)):
        return CheckpointLoadError(
            f"refusing to load checkpoint {str(path)!r}: it holds objects other than tensors and plain values "
            f"({unsafe}); checkpoints are loaded with weights_only=True on purpose, so nothing in it was run"
        )
    return CheckpointLoadError(
        f"cannot read checkpoint {str(path)!r}: the file is truncated or corrupt ({unsafe or _first_sentence(err)})"
    )


def _whole_pickle(path: _PATH) -> bool:
    """Whether the file (a torch zip's ``data.pkl``, or the file itself) parses as one complete pickle. Parsed with
    :mod:`pickletools`, which runs nothing: a plain pickle's opcodes that weights_only refuses, not random bytes."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = Path(path).read_bytes()
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:
        return False


def atomic_save(obj: Any, target: str | os.PathLike) -> None:
    """``torch.save`` to ``.<name>.<random>.tmp`` beside ``target``, fsync, then ``os.replace`` it into place.

    A kill at any moment leaves the previous file or the new one, never half of one; and writers racing for the same
    target (the ranks of a DDP job caching the same statistics) each rename their own temporary file, the last wins.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")  # same file system as the target
    try:
        with open(tmp, "xb") as f:  # the usual permissions (umask), unlike mkstemp's 0600
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, target)  # atomic on POSIX within one file system
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with suppress(OSError):  # make the rename itself durable; not possible on every file system
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written by :func:`atomic_save`, after removing the temporary files of a writer killed earlier.

    Remote paths (``s3://``, ...) fall back to Lightning's own save. Loading is Lightning's, with the errors of an
    unreadable or unsafe file turned into :class:`CheckpointLoadError`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # one writer per checkpoint: rank 0
            stale.unlink(missing_ok=True)
        atomic_save(checkpoint, target)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            if (clear := checkpoint_load_error(path, err)) is None:
                raise
            raise clear from None


def _last_checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """Folders where a ``last*.ckpt`` of this experiment may be: every logger version, or the fixed dirpaths."""
    dirs: list[Path] = []
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.dirpath is not None:
            dirs.append(Path(cb.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name)
            dirs.extend(sorted(root.glob("*/checkpoints")))
        else:
            dirs.append(Path(trainer.default_root_dir) / "checkpoints")
    return dirs


def find_last_checkpoint(trainer: L.Trainer) -> str | None:
    """Newest (by modification time) ``last*.ckpt`` of any run of this experiment or ``hpc_ckpt_N.ckpt``; or None."""
    candidates = [p for d in _last_checkpoint_dirs(trainer) for p in d.glob("last*.ckpt")]
    candidates += Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")  # written on SLURM's pre-timeout signal
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime).resolve())


def rng_states(device: torch.device) -> dict[str, Tensor]:
    """The global torch generator states this process draws from: CPU, and ``device``'s when it is a GPU."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Tensor], device: torch.device) -> None:
    """Restore what :func:`rng_states` captured (the GPU state only on a GPU)."""
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


class ExactResume(Callback):
    """Saves the global generator states in every checkpoint (``checkpoint["rng_states"]``) and restores them right
    before the first resumed training step, after the sanity check and the loaders' set-up: ``t``, noise and dropout
    masks then continue as in the uninterrupted run. The CLI adds it to every run
    (:class:`~ddpm_lightning.cli.DDPMCLI`).
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Tensor] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states(pl_module.device)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._to_restore = checkpoint.get("rng_states")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is not None and trainer.ckpt_path:
            set_rng_states(self._to_restore, pl_module.device)
        self._to_restore = None


def _quiet_sigterm_notifier(trainer: L.Trainer) -> Callable[[int, Any], None]:
    """Lightning's ``_SignalConnector._sigterm_notifier_fn`` without its collective broadcast."""
    connector = trainer._signal_connector

    def notify(signum: int, frame: Any) -> None:
        rank_zero_info("Received SIGTERM: finishing this step, then writing last.ckpt")
        if not connector.received_sigterm and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # the processes this one launched get it too
        connector.received_sigterm = True

    return notify


class FinalCheckpoint(Checkpoint):
    """``last.ckpt`` at the last completed step, however training stops; the CLI adds it to every run.

    Lightning's :class:`ModelCheckpoint` writes ``last.ckpt`` only beside a top-k save (or at the end of a run that
    saved nothing), so a run stopped by ``max_steps``/``max_time`` mid-epoch, by SIGTERM or by Ctrl-C loses every step
    since the last epoch end. Here, at the end of the step after which the run stops, ``last.ckpt`` of the first
    :class:`ModelCheckpoint` is written (atomically, through the strategy's checkpoint IO) unless it already holds
    that step; the state is the one of a mid-epoch ``every_n_train_steps`` save, so ``--ckpt_path last`` resumes
    exactly. The stops:

    * ``max_steps`` reached, or ``trainer.should_stop`` set by the ``max_time`` Timer: at that step's end;
    * SIGTERM (``scancel``, an eviction; Lightning sets ``trainer.received_sigterm``): the running step ends, the
      checkpoint is written and the process exits with 143 (128 + SIGTERM). Under SLURM's requeue, SIGUSR1 makes
      Lightning write ``hpc_ckpt_N.ckpt`` and requeue; the SIGTERM that follows writes ``last.ckpt`` as well;
    * Ctrl-C (SIGINT): the running step ends, the checkpoint is written, then KeyboardInterrupt (a second Ctrl-C
      interrupts at once, writing nothing more);
    * early stopping and ``max_epochs``: at the end of the last epoch, if ``last.ckpt`` is not already at that step;
      a signal that arrives during validation or the epoch's sample grids: at that epoch's end.

    Under DDP the ranks agree on a signal at each step's end (one all-reduce of two flags), so all of them write
    and stop at the same step.

    The closing log line names the file. A :class:`Checkpoint` for Lightning, so that its epoch-end hook runs with
    the monitoring callbacks, after :class:`EarlyStopping` has decided.
    """

    def __init__(self) -> None:
        self._interrupted = False
        self._sigint_handler: Any = None
        self._written: dict[str, int] = {}  # path of each last.ckpt -> the global step it holds, once known

    # -- Ctrl-C: finish the step, then stop; SIGTERM: noted --------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._interrupted, self._written = False, {}
        if threading.current_thread() is threading.main_thread():
            self._sigint_handler = signal.signal(signal.SIGINT, self._on_sigint)
        # Lightning registers its SIGTERM handler right after on_fit_start. Under DDP its handler broadcasts from
        # inside the signal handler, wherever each rank happens to be (in a gradient all-reduce, say): a collective
        # mismatch that kills the run before anything is saved (measured: gloo, 2 CPU processes). This one only
        # notes the signal (and forwards it to the launcher's children, as Lightning's does); the ranks agree on the
        # stop at the end of the step (:meth:`_signals`), write last.ckpt together and exit.
        trainer._signal_connector._sigterm_notifier_fn = _quiet_sigterm_notifier(trainer)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True
        rank_zero_info("Ctrl-C: stopping after this step and writing last.ckpt (Ctrl-C again to stop at once)")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._sigint_handler is not None:
            signal.signal(signal.SIGINT, self._sigint_handler)
            self._sigint_handler = None

    # -- the stops -----------------------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sigterm, interrupted = self._signals(trainer)
        limit = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        stopping = trainer.should_stop and trainer.fit_loop._can_stop_early  # the max_time Timer, a callback
        if sigterm or interrupted or limit or stopping:
            self._save(trainer)
        self._stop_if_signalled(sigterm, interrupted)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the last epoch, early stopping (decided in validation or by an earlier on_train_epoch_end), a signal that
        # came during validation or the sample grids; here, not in on_train_end, where the EMA callback has already
        # replaced the raw weights by the average
        sigterm, interrupted = self._signals(trainer)
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if last_epoch or sigterm or interrupted or (trainer.should_stop and trainer.fit_loop._can_stop_early):
            self._save(trainer)
        self._stop_if_signalled(sigterm, interrupted)

    def _signals(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """(SIGTERM, Ctrl-C) seen by any rank: a signal may reach one rank only, and every rank must join the save."""
        flags = (trainer.received_sigterm, self._interrupted)
        if trainer.world_size > 1:
            local = torch.tensor(flags, dtype=torch.int32, device=trainer.strategy.root_device)
            seen = trainer.strategy.reduce(local, reduce_op="sum")
            flags = tuple(bool(x) for x in seen.tolist())
        return flags[0], flags[1]

    @staticmethod
    def _stop_if_signalled(sigterm: bool, interrupted: bool) -> None:
        if sigterm:
            raise SIGTERMException(128 + signal.SIGTERM)  # Lightning's own would exit 0, as if the run had finished
        if interrupted:
            raise KeyboardInterrupt

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._announce(trainer, "training ended")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not trainer.sanity_checking:
            # raised by Lightning at a safe point (between steps, in validation); not so any other error: the state
            # may be half-way through a step, or diverged, and last.ckpt keeps the previous good one
            self._save(trainer)
        self._restore_sigint()  # Lightning does not call teardown after an exception
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            self._announce(trainer, "stopped by SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C")

    # -- writing -------------------------------------------------------------------------------------------------------
    @staticmethod
    def _targets(trainer: L.Trainer) -> list[ModelCheckpoint]:
        """Every ModelCheckpoint that keeps a last.ckpt (a recipe's and, say, the experiments runner's each have
        one), else the trainer's first ModelCheckpoint."""
        found = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        with_last = [cb for cb in found if cb.save_last]
        return with_last or found[:1]

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == 0 or trainer.fast_dev_run:
            return
        for cb in self._targets(trainer):
            self._save_last(trainer, cb)

    def _save_last(self, trainer: L.Trainer, cb: ModelCheckpoint) -> None:
        step = trainer.global_step
        if cb.last_model_path and self._written.get(cb.last_model_path) == step:
            return
        if (
            cb.last_model_path
            and cb._last_checkpoint_saved == cb.last_model_path
            and cb._last_global_step_saved == step
        ):
            self._written[cb.last_model_path] = step  # ModelCheckpoint wrote last.ckpt at this step itself
            return
        path = cb.format_checkpoint_name(cb._monitor_candidates(trainer), cb.CHECKPOINT_NAME_LAST)
        cb.last_model_path = path  # part of the checkpoint's own state
        trainer.save_checkpoint(path, cb.save_weights_only)
        self._written[path] = step
        # ModelCheckpoint writes nothing more at this step: its on_train_end (and an epoch end after a mid-epoch
        # stop) would replace this file by the state after the epoch, which resumes into the next epoch
        cb._last_checkpoint_saved, cb._last_global_step_saved = path, step

    def _announce(self, trainer: L.Trainer, why: str) -> None:
        """The closing log line: where the final checkpoint is, and its step when known."""
        for cb in self._targets(trainer):
            if not cb.last_model_path or not Path(cb.last_model_path).is_file():
                continue
            step = self._written.get(cb.last_model_path)
            at = f" (step {step})" if step is not None else ""
            rank_zero_info(f"{why}: final checkpoint{at}: {Path(cb.last_model_path).resolve()}")

"""The CLI core: the LightningCLI over :class:`DiffusionModule` and the DataModules, and the one-line errors.

``ddpm fit|validate|test`` is this LightningCLI (``test`` also computes the sample metrics configured under
``metrics``); ``--config`` YAML files; ``--print_config``. Values the data decides (channels, image size, number of
classes) are linked from the DataModule into the model; the same parser and links build a DataModule from a recipe
for the other commands (:func:`datamodule_from_recipe`). Checkpoints given with ``--ckpt_path`` are loaded with
``weights_only=True`` by default. The commands (:mod:`ddpm_lightning.commands`) use this module, never the reverse;
``ddpm`` itself is :func:`ddpm_lightning.main.main`. ``python -m ddpm_lightning.cli fit|validate|test ...`` runs
the LightningCLI alone (what ``torchrun`` starts).

Bad input (an unknown schedule, an impossible image size, a missing dataset, ...) ends with a one-line
``ddpm: error: ...`` and exit code 2 (:func:`one_line_errors`); set ``DDPM_DEBUG=1`` to see the full traceback.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ddpm_lightning.callbacks.batch_size import EffectiveBatchSize
from ddpm_lightning.callbacks.metrics import SampleMetrics
from ddpm_lightning.checkpointing import (
    AtomicCheckpointIO,
    CheckpointLoadError,
    ExactResume,
    FinalCheckpoint,
    checkpoint_load_error,
    find_last_checkpoint,
)
from ddpm_lightning.classifier import ClassifierModule
from ddpm_lightning.data import DatasetNotFoundError, ImageDataModule
from ddpm_lightning.module import DiffusionModule, NonFiniteLossError
from ddpm_lightning.precision import Trainer

#: error types that mean "the user's input is wrong", reported in one line
USER_ERRORS: tuple[type[BaseException], ...] = (
    ArgumentError,  # a config key or value the parser rejects
    ValueError,
    FileNotFoundError,
    DatasetNotFoundError,
    pickle.UnpicklingError,
    CheckpointLoadError,  # --ckpt_path names a truncated, corrupt or unsafe file
    NonFiniteLossError,  # the loss diverged: the message names the step and the last good checkpoint
)


class DDPMCLI(LightningCLI):
    """LightningCLI with the data-to-model links of this project."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--untrained",
            type=bool,
            default=False,
            help="validate/test without --ckpt_path: a randomly initialised network, on purpose",
        )
        if self.model_class is DiffusionModule:
            # FID/KID/IS and conditional accuracy: always at `ddpm test`, during `fit` only if every_n_epochs is set
            parser.add_lightning_class_args(SampleMetrics, "metrics")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            # nothing a user downloads can run code: checkpoints hold tensors and plain values only
            parser.set_defaults(weights_only=True)
        return parser

    def _require_checkpoint(self) -> None:
        """validate/test score a trained model: without --ckpt_path they would score random weights and exit 0."""
        config = self.config[self.subcommand]
        if config.get("ckpt_path") is None and not config.get("untrained"):
            raise ValueError(
                f"{self.parser.prog} {self.subcommand} needs --ckpt_path CKPT (a checkpoint of `ddpm fit`); "
                "to score an untrained network on purpose, pass --untrained true"
            )

    def before_validate(self) -> None:
        self._require_checkpoint()

    def before_test(self) -> None:
        self._require_checkpoint()

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyperparameters here, first (with weights_only=True): name a bad file here
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            if (clear := checkpoint_load_error(self.config[self.config.subcommand].get("ckpt_path"), err)) is None:
                raise
            raise clear from None

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        self._check_max_time()
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:  # a trainer setting Lightning refuses: the user's input, one line
            raise ValueError(" ".join(str(err).split())) from None
        # every run resumes exactly, checkpoints its last step at any stop (when it checkpoints at all: FinalCheckpoint
        # writes ModelCheckpoint's last.ckpt) and says its batch size
        always = [ExactResume, EffectiveBatchSize]
        if isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            always.insert(1, FinalCheckpoint)
        for kind in always:
            if not any(isinstance(cb, kind) for cb in trainer.callbacks):
                trainer.callbacks.append(kind())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: no plugin in the YAML
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # a kill never leaves a torn last.ckpt
        return trainer

    def _check_max_time(self) -> None:
        """``--trainer.max_time`` parsed as Lightning's Timer will (which raises a traceback): else one line."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        max_time = config["trainer"].get("max_time")
        if max_time is None:
            return
        try:
            Timer(duration=max_time.as_dict() if isinstance(max_time, Namespace) else max_time)
        except (MisconfigurationException, TypeError, ValueError, AttributeError):
            raise ValueError(
                f"--trainer.max_time {max_time!r} is not a duration: give DD:HH:MM:SS (days:hours:minutes:seconds, "
                "e.g. 00:12:00:00 for 12 hours) or a mapping such as {hours: 12}"
            ) from None

    def fit(self, model: L.LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """``trainer.fit``; ``--ckpt_path last`` is the newest last/hpc checkpoint of any earlier run of this logger."""
        if ckpt_path == "last":
            ckpt_path = find_last_checkpoint(self.trainer)
            if ckpt_path is None:
                rank_zero_warn("--ckpt_path last: no checkpoint of an earlier run found, training from scratch")
            else:
                rank_zero_info(f"--ckpt_path last: resuming from {ckpt_path}")
        self.trainer.fit(model, ckpt_path=ckpt_path, **kwargs)


PROG = "ddpm"  # the console script (pyproject's [project.scripts])


def build_cli(args: list[str] | None = None, run: bool = True) -> DDPMCLI:
    """Construct (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by the tests)."""
    return _build(DiffusionModule, PROG, args, run)


def build_classifier_cli(args: list[str] | None = None, run: bool = True) -> DDPMCLI:
    """The ``ddpm classifier`` CLI: same subcommands and data links, over :class:`ClassifierModule`."""
    return _build(ClassifierModule, f"{PROG} classifier", args, run)


def _build(model_class: type, prog: str, args: list[str] | None, run: bool) -> DDPMCLI:
    return DDPMCLI(
        model_class,
        ImageDataModule,
        trainer_class=Trainer,  # Lightning's, plus precision: auto
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=args,
        run=run,
        # log dirs are versioned, so this only overwrites the config.yaml a logger-less run left in its root dir
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": prog, "parser_mode": "yaml", "allow_abbrev": False, "exit_on_error": False},
    )


def datamodule_from_recipe(recipe: str | os.PathLike, data_root: str | None = None, *overrides: str) -> ImageDataModule:
    """The DataModule of a training recipe, built by the same parser, defaults and links as ``ddpm fit``.

    ``data_root`` replaces ``data.root`` and turns the download off; ``overrides`` are further ``--key value``
    arguments. Nothing is trained and no logger is created.
    """
    args = ["--config", str(recipe), "--trainer.logger", "false", "--trainer.callbacks", "[]", *overrides]
    if data_root is not None:
        args += ["--data.root", str(data_root), "--data.download", "false"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _build(DiffusionModule, PROG, args, run=False)
    return cli.datamodule


@contextmanager
def one_line_errors(command: str) -> Iterator[None]:
    """Turn a user error raised inside into ``ddpm: error: ...`` (one line) and exit code 2; ``DDPM_DEBUG=1`` keeps
    the traceback. ``command`` names the ``--help`` to read after a rejected option."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("DDPM_DEBUG"):
            raise
        msg = " ".join(line.strip() for line in str(err).strip().splitlines()) or type(err).__name__
        if isinstance(err, ArgumentError):
            msg += f" (see `{PROG} {command} --help`)"
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        sys.exit(2)


def run_lightning(argv: list[str], classifier: bool = False) -> DDPMCLI:
    """``ddpm [classifier] fit|validate|test ...``: ``argv`` starts with the subcommand."""
    with warnings.catch_warnings():
        # argv goes in as `args`; Lightning warns when sys.argv has arguments too
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return (build_classifier_cli if classifier else build_cli)(argv)


if __name__ == "__main__":
    with one_line_errors(" ".join(sys.argv[1:2]) or "fit"):
        run_lightning(sys.argv[1:])

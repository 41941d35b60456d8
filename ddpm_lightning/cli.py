"""``ddpm``: the LightningCLI over :class:`DiffusionModule` and the DataModules.

Subcommands ``fit``, ``validate``, ``test`` and ``predict``; ``--config`` YAML files; ``--print_config``. Values the
data decides (channels, image size, number of classes) are linked from the DataModule into the model. Checkpoints
given with ``--ckpt_path`` are loaded with ``weights_only=True`` by default.

Bad input (an unknown schedule, an impossible image size, a missing dataset, ...) ends with a one-line
``ddpm: error: ...`` and exit code 2; set ``DDPM_DEBUG=1`` to see the full traceback instead.
"""

from __future__ import annotations

import os
import pickle
import sys
from argparse import ArgumentError
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ddpm_lightning.data import DatasetNotFoundError, ImageDataModule
from ddpm_lightning.module import DiffusionModule

#: error types that mean "the user's input is wrong", reported in one line
USER_ERRORS: tuple[type[BaseException], ...] = (
    ArgumentError,  # a config key or value the parser rejects
    ValueError,
    FileNotFoundError,
    DatasetNotFoundError,
    pickle.UnpicklingError,
)


class DDPMCLI(LightningCLI):
    """LightningCLI with the data-to-model links of this project."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            # nothing a user downloads can run code: checkpoints hold tensors and plain values only
            parser.set_defaults(weights_only=True)
        return parser


def build_cli(args: list[str] | None = None, run: bool = True) -> DDPMCLI:
    """Construct (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by the tests)."""
    return DDPMCLI(
        DiffusionModule,
        ImageDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=args,
        run=run,
        parser_kwargs={"parser_mode": "yaml", "allow_abbrev": False, "exit_on_error": False},
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning user errors into one line and exit code 2."""
    try:
        build_cli(args)
    except USER_ERRORS as err:
        if os.environ.get("DDPM_DEBUG"):
            raise
        msg = " ".join(line.strip() for line in str(err).strip().splitlines()) or type(err).__name__
        print(f"ddpm: error: {msg}", file=sys.stderr)
        if isinstance(err, ArgumentError):
            print("ddpm: see `ddpm --help` and `ddpm SUBCOMMAND --help` for the options", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""What every ``ddpm`` command shares: one jsonargparse parser style, recipe files, sampling flags, one-line errors.

A command is a module with ``DESCRIPTION``, ``add_arguments(parser)``, ``run(cfg)`` and optionally
``from_recipe(recipe, path) -> options``; :func:`run_command` builds its parser, parses and runs it.

``--config FILE`` (one jsonargparse config action, :class:`RecipeOrOptions`) takes either a training recipe (a file
with ``model``/``data``/``trainer`` sections, as in ``configs/``): the command reads what it needs from it (e.g.
``model.sampling``); or a file of this command's own options, as ``--print_config`` writes it. Either is applied
where it stands on the command line: options given after ``--config`` override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ddpm_lightning.sampling import SamplingConfig

RECIPE_SECTIONS = ("model", "data", "trainer")
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig))
#: fields whose None is a value (sigma_max: null = the schedule's end; guidance_interval: null = guide every step;
#: spacing: null = the solver's own), not "unset": their flags are left out of the parsed options unless given
NULLABLE_SAMPLING_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(SamplingConfig)
    if type(None) in typing.get_args(typing.get_type_hints(SamplingConfig)[f.name])
)


class RecipeOrOptions(ActionConfigFile):
    """``--config FILE``: a training recipe, read through the command's ``from_recipe``, or a file of its options."""

    from_recipe: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    prog = "ddpm"

    def __call__(self, parser: ArgumentParser, cfg: Namespace, values: Any, option_string: str | None = None) -> None:
        recipe = read_recipe(values) if isinstance(values, (str, os.PathLike)) else None
        if recipe is None:  # a file (or string) of this command's own options: jsonargparse's own config file
            return super().__call__(parser, cfg, values, option_string)
        if self.from_recipe is None:
            raise ValueError(f"{self.prog} reads no training recipe; --config takes a file of its own options")
        # the options the recipe gives, applied here as a config string (what ActionConfigFile also accepts)
        return super().__call__(parser, cfg, json.dumps(self.from_recipe(recipe, str(values))), option_string)


def new_parser(prog: str, description: str, from_recipe: Callable | None = None) -> ArgumentParser:
    """The parser style of every command: YAML, no prefix abbreviations, errors raised (one line, exit 2), and a
    ``--config`` that reads a training recipe through ``from_recipe`` (None: this command reads none)."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, parser_mode="yaml")
    action = type("RecipeOrOptions", (RecipeOrOptions,), {"from_recipe": staticmethod(from_recipe), "prog": prog})
    parser.add_argument("--config", action=action, help="a training recipe or a file of these options")
    return parser


def add_sampling_arguments(parser: ArgumentParser, what: str = "the checkpoint's own (model.sampling)") -> None:
    """One flag per :class:`SamplingConfig` field (``--sampler``, ``--num_steps``, ...); unset means {what}.
    ``--sigma_max null`` is the schedule's end."""
    hints = typing.get_type_hints(SamplingConfig)
    for f in dataclasses.fields(SamplingConfig):
        default = argparse.SUPPRESS if f.name in NULLABLE_SAMPLING_FIELDS else None
        parser.add_argument(f"--{f.name}", type=hints[f.name] | None, default=default, help=f"sampling: {f.name}")
    parser.description = (parser.description or "") + f" Sampling flags left unset: {what}."


def sampling_from(cfg: Namespace, base: SamplingConfig | None) -> SamplingConfig:
    """``base`` with the sampling flags that were set."""
    given = {k: cfg[k] for k in SAMPLING_FIELDS if k in cfg and (cfg[k] is not None or k in NULLABLE_SAMPLING_FIELDS)}
    return SamplingConfig.of(base, **given)


def read_recipe(path: str | Path) -> dict[str, Any] | None:
    """The recipe's sections if ``path`` is a training recipe, else None (a file of the command's own options)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise FileNotFoundError(f"--config {str(path)!r}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"--config {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if isinstance(data, dict) and any(key in data for key in RECIPE_SECTIONS):
        return data
    return None


def recipe_sampling(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``model.sampling`` section (empty if it has none)."""
    return dict(((recipe.get("model") or {}).get("sampling")) or {})


def build_parser(command: ModuleType, prog: str) -> ArgumentParser:
    parser = new_parser(prog, command.DESCRIPTION, getattr(command, "from_recipe", None))
    command.add_arguments(parser)
    return parser


def run_command(command: ModuleType, prog: str, argv: Sequence[str]) -> Any:
    """Parse ``argv`` for ``command`` and run it."""
    cfg = build_parser(command, prog).parse_args(list(argv))
    cfg.pop("config", None)
    return command.run(cfg)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

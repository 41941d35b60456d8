"""What every ``ddpm`` command shares: one jsonargparse parser style, recipe files, sampling flags, one-line errors.

A command is a module with ``DESCRIPTION``, ``add_arguments(parser)``, ``run(cfg)`` and optionally
``from_recipe(recipe, path) -> defaults``; :func:`run_command` builds its parser, applies ``--config`` and runs it.

``--config FILE`` takes either a training recipe (a file with ``model``/``data``/``trainer`` sections, as in
``configs/``): the command reads what it needs from it (e.g. ``model.sampling``); or a file of this command's own
options, as ``--print_config`` writes it. Options given after ``--config`` override it.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ddpm_lightning.sampling import SamplingConfig

RECIPE_SECTIONS = ("model", "data", "trainer")
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig))


def new_parser(prog: str, description: str) -> ArgumentParser:
    """The parser style of every command: YAML, no prefix abbreviations, errors raised (one line, exit 2)."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, parser_mode="yaml")
    parser.add_argument("--config", action=ActionConfigFile, help="a training recipe or a file of these options")
    return parser


def add_sampling_arguments(parser: ArgumentParser, what: str = "the checkpoint's own (model.sampling)") -> None:
    """One flag per :class:`SamplingConfig` field (``--sampler``, ``--num_steps``, ...); unset means {what}."""
    hints = typing.get_type_hints(SamplingConfig)
    for f in dataclasses.fields(SamplingConfig):
        parser.add_argument(f"--{f.name}", type=hints[f.name] | None, default=None, help=f"sampling: {f.name}")
    parser.description = (parser.description or "") + f" Sampling flags left unset: {what}."


def sampling_from(cfg: Namespace, base: SamplingConfig | None) -> SamplingConfig:
    """``base`` with the sampling flags that were set."""
    return SamplingConfig.of(base, **{k: cfg[k] for k in SAMPLING_FIELDS if cfg.get(k) is not None})


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


def _split_recipe(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """argv without the ``--config RECIPE`` pairs, and those recipes (path, sections) in order."""
    rest: list[str] = []
    recipes: list[tuple[str, dict[str, Any]]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        path = None
        if arg == "--config" and i + 1 < len(argv):
            path, step = argv[i + 1], 2
        elif arg.startswith("--config="):
            path, step = arg.split("=", 1)[1], 1
        if path is not None and (recipe := read_recipe(path)) is not None:
            recipes.append((path, recipe))
            i += step
            continue
        rest.append(arg)
        i += 1
    return rest, recipes


def build_parser(command: ModuleType, prog: str) -> ArgumentParser:
    parser = new_parser(prog, command.DESCRIPTION)
    command.add_arguments(parser)
    return parser


def run_command(command: ModuleType, prog: str, argv: Sequence[str]) -> Any:
    """Parse ``argv`` for ``command`` (recipes first, as defaults) and run it."""
    parser = build_parser(command, prog)
    rest, recipes = _split_recipe(list(argv))
    for path, recipe in recipes:
        if not hasattr(command, "from_recipe"):
            raise ValueError(f"{prog} reads no training recipe; --config takes a file of its own options")
        parser.set_defaults(**command.from_recipe(recipe, path))
    cfg = parser.parse_args(rest)
    cfg.pop("config", None)
    return command.run(cfg)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

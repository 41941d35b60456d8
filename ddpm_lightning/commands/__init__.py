"""The ``ddpm`` commands, one registry: ``ddpm --help`` lists it, ``ddpm NAME ...`` runs its entry.

``fit``/``validate``/``test`` and ``classifier fit|validate|test`` are the LightningCLI of :mod:`ddpm_lightning.cli`
over the DiffusionModule and the ClassifierModule; the others are jsonargparse parsers built the same way
(:mod:`ddpm_lightning.commands.base`): ``--config``, ``--print_config``, one-line errors. The arrows run one way:
the commands use the CLI core; :mod:`ddpm_lightning.main` dispatches to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from ddpm_lightning.cli import run_lightning
from ddpm_lightning.commands.base import run_command


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[list[str]], Any]


def _module(name: str, prog: str) -> Callable[[list[str]], Any]:
    return lambda argv: run_command(import_module(f"ddpm_lightning.commands.{name}"), prog, argv)


def _classifier(argv: list[str]) -> Any:
    if argv[:1] == ["export"]:
        return _module("classifier_export", "ddpm classifier export")(argv[1:])
    return run_lightning(argv, classifier=True)


def _predict(argv: list[str]) -> Any:
    raise ValueError(
        "generation is `ddpm sample --ckpt_path CKPT [--num_samples N --labels ... --sampler ... --num_steps ...]` "
        "(writes a grid, PNGs, an .npz and a trajectory); see `ddpm sample --help`"
    )


COMMANDS: dict[str, Command] = {
    "fit": Command("train a model: ddpm fit --config configs/mnist.yaml", lambda argv: run_lightning(["fit", *argv])),
    "validate": Command("validation loss of a checkpoint", lambda argv: run_lightning(["validate", *argv])),
    "test": Command(
        "test loss and sample metrics (FID/KID/IS, accuracy) of a checkpoint", lambda a: run_lightning(["test", *a])
    ),
    "sample": Command("write samples of a checkpoint (grid, PNGs, npz, trajectory)", _module("sample", "ddpm sample")),
    "sweep": Command("sample quality and cost against steps / samplers", _module("sweep", "ddpm sweep")),
    "phema": Command(
        "the EMA of any length after training, from post-hoc EMA snapshots", _module("phema", "ddpm phema")
    ),
    "export": Command("write a checkpoint as a diffusers folder with a model card", _module("export", "ddpm export")),
    "demo": Command("a web page that samples from a checkpoint (demo extra)", _module("demo", "ddpm demo")),
    "classifier": Command("fit | validate | test | export the metrics' domain classifier", _classifier),
    "predict": Command("(generation is `ddpm sample`)", _predict),
}


def usage() -> str:
    """``ddpm --help``: every command of :data:`COMMANDS` with its one-line help."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: ddpm COMMAND [options]      (ddpm COMMAND --help: the options of one command)",
        "",
        "Train, sample and evaluate denoising diffusion probabilistic models (DDPM) with PyTorch Lightning.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)

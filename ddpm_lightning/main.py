"""``ddpm``, the console script: ``ddpm COMMAND ...`` runs a command of the registry, ``ddpm --help`` lists them.

The top of the house: it dispatches to :mod:`ddpm_lightning.commands`, which use the CLI core
(:mod:`ddpm_lightning.cli`); user errors end in one line, ``ddpm: error: ...``, and exit code 2.
"""

from __future__ import annotations

import sys

from ddpm_lightning.cli import one_line_errors
from ddpm_lightning.commands import COMMANDS, usage


def main(args: list[str] | None = None) -> None:
    """Run ``ddpm`` with ``args`` (default: ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    with one_line_errors(argv[0]):
        if argv[0] not in COMMANDS:
            raise ValueError(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        COMMANDS[argv[0]].run(argv[1:])


if __name__ == "__main__":
    main()

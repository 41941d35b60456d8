"""Write constraints/ci.txt: the exact version of every distribution an install of ddpm-lightning with all its
extras pulls in, read from the environment it runs in (so run it in the CI environment, after an upgrade).

    python scripts/freeze_constraints.py              # rewrite constraints/ci.txt
    python scripts/freeze_constraints.py --check      # exit 1 if the file differs from this environment

Only the dependency closure of ``ddpm-lightning[<every extra>]`` is written (requirement markers evaluated here),
not whatever else the environment holds, so the file pins what `pip install -e ".[dev,bench]"` resolves.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = "ddpm-lightning"
#: installed beside the project with `pip install --no-deps NAME -c constraints/ci.txt` (see the Makefile's install
#: target): pinned here when the environment has them, their own requirements not followed
NO_DEPS = ("k-diffusion",)
HEADER = """\
# Exact versions of everything `pip install -e ".[dev,bench]"` installs, as CI resolved it. CI and `make install`
# install with `-c constraints/ci.txt`, so a run today and a run next month get the same packages; the ranges in
# pyproject.toml say what is supported (tests/test_install.py checks that they admit these pins).
# Regenerate in the CI environment after an upgrade: python scripts/freeze_constraints.py
"""


def closure(project: str) -> dict[str, str]:
    """{canonical name: version} of ``project`` with all its extras and everything they require, recursively."""
    env = default_environment()
    root = metadata.distribution(project)
    todo = [(project, frozenset(root.metadata.get_all("Provides-Extra") or []))]
    seen: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in visited:
            continue
        visited.add((name, extras))
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate(env | {"extra": e}) for e in (extras or {""})):
                continue
            try:
                dep = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency this environment does not hold (e.g. for another platform)
            key = canonicalize_name(req.name)
            if key != canonicalize_name(project):
                seen[key] = dep.version
            todo.append((req.name, frozenset(req.extras)))
    return seen


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", type=Path, default=REPO / "constraints" / "ci.txt")
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args(argv)
    pins = closure(PROJECT)
    for name in NO_DEPS:
        try:
            pins[canonicalize_name(name)] = metadata.version(name)
        except metadata.PackageNotFoundError:
            print(f"note: {name} is not installed here, so not pinned", file=sys.stderr)
    text = render(pins)
    if args.check:
        same = args.output.exists() and args.output.read_text() == text
        print(f"{args.output}: {'up to date' if same else 'differs from this environment'}")
        return 0 if same else 1
    args.output.write_text(text)
    print(f"wrote {args.output} ({text.count('==')} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

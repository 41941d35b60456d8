"""The install: pyproject.toml states supported version ranges (so pip keeps a cluster's own torch), and
constraints/ci.txt pins what CI resolved; the ranges must admit every pin, or CI would test an unsupported set."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
PROJECT = "ddpm-lightning"


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements() -> dict[str, list[Requirement]]:
    """{"runtime": [...], "<extra>": [...]} without the extras' references to the project itself."""
    project = _project()
    groups = {"runtime": project["dependencies"], **project["optional-dependencies"]}
    return {
        group: [r for r in map(Requirement, texts) if canonicalize_name(r.name) != PROJECT]
        for group, texts in groups.items()
    }


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints" / "ci.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # one exact pin per line
        assert spec.operator == "==" and "*" not in spec.version, line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(spec.version)
    return pins


def test_the_ranges_admit_every_pin_of_the_constraints():
    pins = _pins()
    for group, requirements in _requirements().items():
        for req in requirements:
            name = canonicalize_name(req.name)
            assert name in pins, f"{req} ({group}) has no pin in constraints/ci.txt"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"pyproject.toml's {req} ({group}) does not admit constraints/ci.txt's {name}=={pins[name]}"
            )
    # the extras' own requirements are pinned too (jsonargparse[signatures] pulls docstring-parser, ...)
    assert {"torch", "torchvision", "lightning", "docstring-parser", "typeshed-client"} <= pins.keys()


def test_no_dependency_is_an_exact_pin():
    """An exact pin would make pip replace a cluster's CUDA build of torch; pins belong in constraints/ci.txt."""
    for group, requirements in _requirements().items():
        for req in requirements:
            exact = [s for s in req.specifier if s.operator in ("==", "===")]
            assert not exact, f"{req} ({group}) is an exact pin; give a range in pyproject.toml"
    runtime = {canonicalize_name(r.name): r for r in _requirements()["runtime"]}
    assert all(runtime[name].specifier for name in runtime), "every runtime dependency states a floor"
    torch = runtime["torch"].specifier
    assert torch.contains("2.4.0") and not torch.contains("2.3.1")  # the floor of pyproject.toml's comment


def test_ci_and_make_install_use_the_constraints():
    assert "-c constraints/ci.txt" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    install = makefile.split("\ninstall:")[1].split("\n\n")[0]
    assert "-c constraints/ci.txt" in install
    no_deps = "pip install --quiet --no-deps k-diffusion -c constraints/ci.txt"
    assert no_deps in (REPO / ".ci" / "run").read_text() and no_deps.replace("--quiet ", "") in install

"""scripts/install_keep_torch.sh (`make install-keep-torch`) ends in a working `ddpm`, or in one line that names the
torchvision matching the installed torch.

Each test runs the real script with real pip in a fresh virtual environment. To keep that to seconds, the environment
sees this one's packages (through a .pth file naming a folder of links to them) except the torch family and
ddpm-lightning, which the test and the script install into it; pip never changes packages outside an environment.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "scripts" / "install_keep_torch.sh"
#: the torch family (packages, their .libs and .dist-info folders), which the test or the script installs
TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchgen|functorch|triton)([-.].*)?$|^(nvidia|cuda)([-_].*)?$", re.I)
#: the project itself (the script installs it) and .pth files (a seed folder's are not read anyway)
PROJECT = re.compile(r"^(ddpm_lightning[-.]|__editable__)|\.pth$", re.I)
#: a torch CPU build whose torchvision on PyPI is built for the CUDA torch of the same release
CPU_WHEEL = "torch-2.13.0+cpu-*.whl"


def _seeded_venv(root: Path, keep_torch: bool) -> Path:
    """A venv whose python sees this environment's packages but the project and (unless ``keep_torch``) torch's."""
    seed = root / "seed"
    seed.mkdir()
    site = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    for entry in sorted(p for folder in site for p in folder.iterdir()):
        if PROJECT.search(entry.name) or (TORCH_FAMILY.match(entry.name) and not keep_torch):
            continue
        (seed / entry.name).symlink_to(entry)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "seed.pth").write_text(f"{seed}\n")
    return python


def _env() -> dict[str, str]:
    """This environment without PYTHONPATH: the venv's own install is what runs."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run_script(python: Path) -> subprocess.CompletedProcess:
    env = {**_env(), "PYTHON": str(python)}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)


def _find_links() -> list[Path]:
    """Folders pip takes wheels from (PIP_FIND_LINKS, pip's config), and DDPM_TORCH_CPU_WHEEL's folder."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            links += shlex.split(value.strip().strip("'\""))
    if wheel := os.environ.get("DDPM_TORCH_CPU_WHEEL"):
        links.insert(0, str(Path(wheel).parent))
    return [Path(link.removeprefix("file://")) for link in links]


@pytest.mark.slow
def test_install_keeping_torch_ends_in_a_working_ddpm(tmp_path):
    """torch and torchvision already there (this environment's): kept, the project installed, `ddpm --help` runs."""
    python = _seeded_venv(tmp_path, keep_torch=True)
    proc = _run_script(python)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before, after = re.findall(r"^install_keep_torch: torch (?:before|after): +(.+)$", proc.stdout, re.MULTILINE)
    assert before == after
    ok = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"install_keep_torch: ok: torch \S+, torchvision \S+, `ddpm --help` runs \(.+/ddpm\)", ok)
    assert (python.parent / "ddpm").is_file()


@pytest.mark.slow
def test_install_beside_a_cpu_torch_stops_in_one_line_on_a_mismatched_torchvision(tmp_path):
    """A CPU build of torch and no torchvision: pip picks PyPI's (built for the CUDA torch), whose operators do not
    load (`operator torchvision::nms does not exist`); the script stops in one line naming the +cpu build."""
    wheels = sorted(w for folder in _find_links() if folder.is_dir() for w in folder.glob(CPU_WHEEL))
    if not wheels:
        pytest.skip(f"no {CPU_WHEEL} among pip's find-links (or DDPM_TORCH_CPU_WHEEL)")
    python = _seeded_venv(tmp_path, keep_torch=False)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheels[-1])], check=True, env=_env())
    torch_version = wheels[-1].name.split("-")[1]  # 2.13.0+cpu

    proc = _run_script(python)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"torch after:  {torch_version} cuda None" in proc.stdout  # torch kept
    errors = [line for line in proc.stderr.splitlines() if line.startswith("install_keep_torch: error")]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr[-3000:]
    chosen = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('torchvision'))"],
        capture_output=True,
        text=True,
        env=_env(),
    ).stdout.strip()
    assert errors[0] == (
        f"install_keep_torch: error: torchvision {chosen} does not work with torch {torch_version} "
        "(RuntimeError: operator torchvision::nms does not exist); install the build that matches: "
        f"{python} -m pip install --force-reinstall --no-deps torchvision=={chosen}+cpu "
        "--index-url https://download.pytorch.org/whl/cpu"
    )

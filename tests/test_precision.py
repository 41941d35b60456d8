"""``trainer.precision: auto``: bf16 only where the hardware computes in bf16, fp32 with one log line elsewhere."""

from __future__ import annotations

import pytest
from conftest import REPO

from ddpm_lightning import precision
from ddpm_lightning.cli import build_cli
from ddpm_lightning.precision import cpu_bf16_flags, resolve_precision


def test_cpu_flags_are_read_from_cpuinfo(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n")
    assert cpu_bf16_flags(info) == ["avx512_bf16"]
    info.write_text("flags\t\t: fpu sse avx2 fma amx_tile amx_bf16 avx512_bf16\n")
    assert cpu_bf16_flags(info) == ["avx512_bf16", "amx_bf16"]
    info.write_text("flags\t\t: fpu sse avx2 fma\n")
    assert cpu_bf16_flags(info) == []
    assert cpu_bf16_flags(tmp_path / "missing") == []


@pytest.mark.parametrize(("flags", "expected"), [([], "32-true"), (["avx512_bf16"], "bf16-mixed")])
def test_auto_on_cpu_follows_the_bf16_flags(monkeypatch, lightning_caplog, flags, expected) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    with lightning_caplog.at_level("INFO"):
        assert resolve_precision("auto", "auto") == expected
    lines = [r.getMessage() for r in lightning_caplog.records if "precision auto" in r.getMessage()]
    assert len(lines) == 1 and expected in lines[0]
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"  # anything else passes through untouched


def test_the_cli_takes_auto_and_the_trainer_gets_a_real_precision(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            f"--config={REPO / 'configs' / 'mnist.yaml'}",
            "--trainer.precision=auto",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
        ],
        run=False,
    )
    assert cli.config["trainer"]["precision"] == "auto"  # what the saved config.yaml says
    assert cli.trainer.precision == "32-true"

"""``trainer.precision: auto``: bf16 where the hardware computes in bf16, fp32 elsewhere (one log line says why).

bf16 autocast halves the bytes of activations, but only hardware with bf16 arithmetic makes it faster: a CUDA GPU
that supports it, or a CPU with AVX512-BF16 or AMX-BF16 (oneDNN runs bf16 convolutions and matmuls there). On a
CPU without them every bf16 tensor is converted and computed in fp32, and a training step is several times *slower*
than in fp32 (``benchmarks/training.py`` measures it), so ``auto`` trains in fp32 there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.utilities import rank_zero_info

#: the CPU flags of bf16 arithmetic (Linux /proc/cpuinfo names)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
AUTO = "auto"


def cpuinfo_field(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The value of the first ``name`` line of ``/proc/cpuinfo`` (e.g. ``flags``, ``model name``), or None."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The bf16 arithmetic flags this CPU has (empty where there are none, or no /proc/cpuinfo)."""
    flags = set((cpuinfo_field("flags", cpuinfo) or "").split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def resolve_precision(precision: Any, accelerator: Any = "auto") -> Any:
    """``precision`` itself unless it is ``auto``; then ``bf16-mixed`` where bf16 is computed natively, else
    ``32-true``, saying which and why in one log line."""
    if precision != AUTO:
        return precision
    on_gpu = str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_gpu:
        if torch.cuda.is_bf16_supported():
            rank_zero_info("precision auto: bf16-mixed (the GPU computes in bf16)")
            return "bf16-mixed"
        rank_zero_info("precision auto: 32-true (this GPU has no bf16 arithmetic)")
        return "32-true"
    flags = cpu_bf16_flags()
    if flags:
        rank_zero_info(f"precision auto: bf16-mixed (the CPU computes in bf16: {', '.join(flags)})")
        return "bf16-mixed"
    rank_zero_info(
        "precision auto: 32-true (this CPU has no bf16 arithmetic, avx512_bf16 or amx_bf16: bf16 would be slower)"
    )
    return "32-true"


class Trainer(L.Trainer):
    """Lightning's Trainer, with ``precision: auto`` (see :func:`resolve_precision`); everything else is the same."""

    def __init__(self, *args: Any, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, precision=resolve_precision(precision, kwargs.get("accelerator", "auto")), **kwargs)

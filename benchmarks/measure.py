"""Measuring tools for the benchmark: FLOP counts, the machine's matmul limit, peak memory, clocks, machine facts.

Conventions: FLOPs count a multiply-add as 2 (``torch.utils.flop_counter``); only matmuls, convolutions and
attention are counted (norms, activations and optimizer updates are not), the usual convention of MFU figures.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from ddpm_lightning.precision import cpuinfo_field

#: dense bf16 tensor-core peak in TFLOP/s by device-name fragment (vendor data sheets, SXM parts, no sparsity);
#: the first fragment found in ``torch.cuda.get_device_name()`` wins, so the more specific names come first
GPU_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}

#: side of the square fp32/bf16 matmul that measures the machine's own rate (large enough to reach the peak)
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
#: how often the CPU memory monitor reads the resident set size, in seconds
RSS_POLL_S = 0.002


def _register_cpu_sdpa_flops() -> None:
    """Count the CPU flash-attention kernels, which ``flop_counter`` (torch 2.14) leaves out (counted as 0)."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa_flops()


def count_flops(fn: Callable[[], Tensor], backward: bool) -> int:
    """FLOPs of one call of ``fn`` (and of the backward of its output's sum when ``backward``)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


def flops_per_image(forward: Callable[[Tensor, Tensor], Tensor], net: nn.Module, x: Tensor, train: bool) -> float:
    """FLOPs per image of ``forward(x, t)`` (x (B, C, H, W)), plus its backward when ``train``; grads are reset."""
    t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    was_training = net.training
    net.train(train)
    try:
        if train:
            flops = count_flops(lambda: forward(x, t), backward=True)
            net.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                flops = count_flops(lambda: forward(x, t), backward=False)
    finally:
        net.train(was_training)
    return flops / x.shape[0]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a clock read covers them (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """The best FLOP/s of ``repeats`` square matmuls of ``MATMUL_SIZE`` on ``device``: the machine's own limit."""
    n = MATMUL_SIZE.get(device.type, 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernel selection
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def gpu_bf16_peak(device: torch.device) -> float | None:
    """The data-sheet dense bf16 peak of a CUDA device in FLOP/s, or None when its name is not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in GPU_BF16_PEAK_TFLOPS.items():
        if fragment in name:
            return tflops * 1e12
    return None


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that RSS tracks live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory between ``start()`` and ``stop()``, above what was in use at the start (weights, optimizer state).

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at the start. CPU (Linux): a thread reads the
    resident set size every ``RSS_POLL_S`` and keeps the peak minus the start, after ``malloc_trim`` (torch's CPU
    allocator is malloc, so RSS is the honest measure; ``ru_maxrss`` only grows and cannot separate phases that
    run one after another in one process). ``stop()`` returns None where neither is available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start = 0
        self._peak = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif Path("/proc/self/statm").exists():
            _release_free_heap()
            self._start = self._peak = _rss_bytes()
            self._done.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(RSS_POLL_S)

    def stop(self) -> int | None:
        """Peak bytes above the start, or None where this platform reports neither CUDA nor RSS."""
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._start
        if self._thread is None:
            return None
        self._done.set()
        self._thread.join()
        self._thread = None
        return max(self._peak, _rss_bytes()) - self._start


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    return cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    """user + system clock ticks and command name of every process (Linux ``/proc/PID/stat``)."""
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        ticks[int(stat.parent.name)] = (int(fields[11]) + int(fields[12]), name)  # utime, stime
    return ticks


def busy_processes(interval_s: float = 1.0, min_share: float = 0.2) -> list[str]:
    """Other processes that used more than ``min_share`` of a core over ``interval_s`` ("name (pid) 95%")."""
    if not Path("/proc/self/stat").exists():
        return []
    before = _cpu_ticks()
    time.sleep(interval_s)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (ticks, name) in after.items():
        share = (ticks - before.get(pid, (ticks, name))[0]) / hz / interval_s
        if pid != os.getpid() and share > min_share:
            busy.append(f"{name} ({pid}) {share:.0%}")
    return busy


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


# -- the CPU's FMA peak ------------------------------------------------------------------------------------------
#: FMA pipes per core: two on every x86 server core since Haswell and Zen (one 512-bit FMA unit on some Xeon Silver /
#: Bronze parts, which the flags cannot tell apart: the peak is then overstated by 2x)
FMA_PIPES = 2
#: AMX: bf16 multiply-adds per cycle and core of the tile unit (Intel: 1,024 bf16 FMA = 2,048 FLOP per cycle)
AMX_BF16_FMA_PER_CYCLE = 1024


def cpu_flags() -> set[str]:
    """The ISA flags of the first CPU in ``/proc/cpuinfo`` (empty where there is none)."""
    return set((cpuinfo_field("flags") or "").split())


def cpu_clock_hz() -> tuple[float | None, str]:
    """The core clock and where it was read: cpufreq's maximum (the boost clock) where the kernel exposes it, else the
    ``cpu MHz`` of ``/proc/cpuinfo`` (in a VM the clock the hypervisor reports, often the base clock)."""
    cpufreq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if cpufreq.exists():
        return int(cpufreq.read_text()) * 1e3, "cpufreq cpuinfo_max_freq"
    mhz = cpuinfo_field("cpu MHz")
    if mhz is not None:
        return float(mhz) * 1e6, "/proc/cpuinfo cpu MHz (no cpufreq: boost clock unknown)"
    return None, "unknown"


def cpu_fma_peak(threads: int) -> dict[str, Any]:
    """Peak FLOP/s of ``threads`` cores: cores x clock x FMA lanes x 2 (a multiply-add counts 2), fp32 and bf16.

    fp32 lanes per cycle: FMA_PIPES x (datapath bits / 32); the datapath is 512 bits with AVX-512 except on AMD, whose
    Zen 4 runs 512-bit instructions on 256-bit pipes. bf16: AVX512-BF16's VDPBF16PS does two bf16 multiply-adds per
    32-bit lane (2x fp32); AMX-BF16 does AMX_BF16_FMA_PER_CYCLE; without either, bf16 is converted and computed in
    fp32 (no faster than fp32, and the conversions cost extra).
    """
    flags, vendor = cpu_flags(), _cpu_vendor()
    if "avx512f" in flags:
        bits, isa = (256 if vendor == "AuthenticAMD" else 512), "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        bits, isa = 256, "AVX2+FMA"
    else:
        bits, isa = 128, "SSE"
    fp32_lanes = FMA_PIPES * bits // 32
    if "amx_bf16" in flags:
        bf16_lanes, bf16_isa = AMX_BF16_FMA_PER_CYCLE, "AMX-BF16"
    elif "avx512_bf16" in flags:
        bf16_lanes, bf16_isa = 2 * fp32_lanes, "AVX512-BF16"
    else:
        bf16_lanes, bf16_isa = fp32_lanes, "none (bf16 converted to fp32)"
    clock, clock_source = cpu_clock_hz()
    per_cycle = threads * 2  # cores x FLOP per multiply-add
    return {
        "isa": isa,
        "bf16_isa": bf16_isa,
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
        "cores": threads,
        "clock_hz": clock,
        "clock_source": clock_source,
        "fp32_fma_lanes": fp32_lanes,
        "bf16_fma_lanes": bf16_lanes,
        "fp32": clock * per_cycle * fp32_lanes if clock else None,
        "bf16": clock * per_cycle * bf16_lanes if clock else None,
    }


def _cpu_vendor() -> str:
    return cpuinfo_field("vendor_id") or ""

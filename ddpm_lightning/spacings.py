"""Timestep spacings of the solvers (:mod:`ddpm_lightning.solvers`): which n noise levels a run visits and at which
timesteps it calls the network, laid out as diffusers' schedulers do (pinned in ``tests/test_solvers.py``).

Levels are the variance-exploding sigma = sqrt((1 - abar) / abar) of the continuous-time block of
:class:`~ddpm_lightning.diffusion.GaussianDiffusion`; every schedule starts at sigma_{T-1} (the level of
x_T ~ N(0, I)) and ends at sigma = 0, clean data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from ddpm_lightning.diffusion import GaussianDiffusion

#: where the n steps go: "uniform" = evenly spaced timesteps (diffusers' timestep_spacing="linspace"), "trailing" =
#: evenly spaced back from t=T-1 (Lin et al. 2024, Table 2; diffusers' "trailing"), "karras" = Karras et al. 2022
#: eq. 5 in sigma with rho=7 (diffusers' use_karras_sigmas=True)
Spacing = Literal["uniform", "trailing", "karras"]
SPACINGS: tuple[str, ...] = get_args(Spacing)
#: diffusers lays the steps out in two ways: "multistep" (DPM/UniPC schedulers: integer timesteps, the t=0 end of the
#: uniform grid replaced by sigma=0) and "karras" (Euler/Heun schedulers, after k-diffusion: fractional timesteps)
Convention = Literal["multistep", "karras"]
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5 and Table 1
#: EDM's noise range of "karras" spacing (Karras et al. 2022, Table 1: sigma_max = 80, sigma_min = 0.002), clamped to a
#: schedule's own [sigma_0, sigma_{T-1}]; None stands for the schedule's end (diffusers' use_karras_sigmas)
EDM_SIGMA_MAX = 80.0
EDM_SIGMA_MIN = 0.002


def choice_error(what: str, value: object, allowed: tuple) -> ValueError:
    """The ValueError for an unknown choice, naming the allowed values (as the samplers word it)."""
    return ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class SolverSchedule:
    """The n steps of one solver run.

    Attributes:
        t: (n,) float64 timesteps in [0, T-1] at which denoise_fn is called; t[i] goes with sigmas[i].
        sigmas: (n + 1,) float64 noise levels, strictly decreasing, sigmas[0] = sigma_{T-1}, sigmas[n] = 0.
        integer_t: t is integer-valued and passed to denoise_fn as long (else as float).
        start_scale: the factor of the N(0, I) starting noise: 1 (the DDPM prior x_T ~ N(0, I) at sigma_{T-1}), or,
            for a range cut at sigma_max, the VP sigma_vp = sigma_max / sqrt(1 + sigma_max^2) of EDM's prior
            x_ve ~ N(0, sigma_max^2 I) (Karras et al. 2022, Algorithm 1, line 2; k-diffusion's x = randn * sigma_max).
    """

    t: Tensor
    sigmas: Tensor
    integer_t: bool
    start_scale: float = 1.0

    def __len__(self) -> int:
        return self.t.shape[0]

    def sigma(self, i: int) -> float:
        return float(self.sigmas[i])

    def alpha_sigma(self, i: int) -> tuple[float, float]:
        """VP (alpha, sigma_vp) of level i."""
        alpha, sigma = GaussianDiffusion.alpha_sigma_from_ve_sigma(self.sigma(i))
        return float(alpha), float(sigma)

    def log_snr(self, i: int) -> float:
        """lambda_i = log(alpha / sigma_vp) = -log sigma_i (Lu et al. 2022, Sec. 3.1); +inf at sigma = 0."""
        return -math.log(self.sigma(i)) if self.sigma(i) > 0 else math.inf

    def t_batch(self, i: int, x: Tensor) -> Tensor:
        """(B,) timestep of step i for denoise_fn: long, or float in x's dtype (at least float32: a half-precision
        t would round 999.3 to 1000)."""
        dtype = torch.long if self.integer_t else torch.promote_types(x.dtype, torch.float32)
        value = int(self.t[i]) if self.integer_t else float(self.t[i])
        return torch.full((x.shape[0],), value, device=x.device, dtype=dtype)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. 2022 eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0, ..., n-1; (n,) float64 from sigma_max down to sigma_min (n = 1: [sigma_max])."""
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def max_num_steps(num_timesteps: int, spacing: Spacing, convention: Convention) -> int:
    """The largest num_steps with distinct levels: T, but T-1 for "uniform" multistep (its grid has T+1 points)."""
    return num_timesteps - 1 if spacing == "uniform" and convention == "multistep" else num_timesteps


def _uniform_timesteps(num_timesteps: int, num_points: int) -> Tensor:
    """np.linspace(0, T-1, num_points) reversed, with numpy's arithmetic (i * step, exact end point), float64."""
    grid = torch.arange(num_points, dtype=torch.float64) * ((num_timesteps - 1) / max(num_points - 1, 1))
    grid[-1] = num_timesteps - 1
    return grid.flip(0)


def _trailing_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """round(arange(T, 0, -T/n)) - 1 (Lin et al. 2024, Table 2), float64. diffusers' np.arange computes
    T + i * ((T - T/n) - T), which decides the ties of the rounding; it sometimes yields n + 1 entries (the last
    one -1), which we drop."""
    delta = (num_timesteps - num_timesteps / num_steps) - num_timesteps
    return (num_timesteps + torch.arange(num_steps, dtype=torch.float64) * delta).round() - 1


def sigma_range(diffusion: GaussianDiffusion, sigma_max: float | None, sigma_min: float | None) -> tuple[float, float]:
    """(sigma_max, sigma_min) of a "karras" run: the given ends clamped to the schedule's [sigma_0, sigma_{T-1}], None
    being the schedule's own end.

    Raises:
        ValueError: the clamped range is empty (both ends fall on the same side of the schedule's range).
    """
    table = diffusion.ve_sigmas().cpu()  # (T,)
    low, high = float(table[0]), float(table[-1])
    top = high if sigma_max is None else min(max(sigma_max, low), high)
    bottom = low if sigma_min is None else min(max(sigma_min, low), high)
    if not bottom < top:
        raise ValueError(
            f"sigma_min={sigma_min} and sigma_max={sigma_max}, clamped to the schedule's noise levels "
            f"[{low:.4g}, {high:.4g}], leave no range to sample"
        )
    return top, bottom


def solver_schedule(
    diffusion: GaussianDiffusion,
    num_steps: int,
    spacing: Spacing,
    convention: Convention = "multistep",
    sigma_max: float | None = None,
    sigma_min: float | None = None,
) -> SolverSchedule:
    """Timesteps and noise levels of an n-step solver run, as diffusers' schedulers lay them out.

    * "uniform", multistep: t = round(linspace(0, T-1, n+1)) without its 0 end: the step from the smallest t
      lands on sigma=0. karras convention: t = linspace(0, T-1, n), fractional, sigma linearly interpolated between
      the discrete levels (diffusers: linear in sigma, not in log sigma); n = 1 is the single step t = T-1
      (diffusers would start at t=0).
    * "trailing": t = round(T - i T/n) - 1, integers, both conventions.
    * "karras": :func:`karras_sigmas` from sigma_max down to sigma_min (:func:`sigma_range`: None is the schedule's
      end, sigma_{T-1} and sigma_0, as diffusers; EDM's 80 and 0.002 as k-diffusion's get_sigmas_karras), t from
      :meth:`GaussianDiffusion.t_from_ve_sigma`; multistep (diffusers): the network sees round(t) while the step
      uses the Karras sigma itself. n = 1 is the single level sigma_max (diffusers' Euler/Heun would use sigma_0).
      A sigma_max given (not None) starts from EDM's prior (``start_scale``).
    * "trailing" with the n + 1 timesteps diffusers' np.arange sometimes gives (the last one -1): we keep n.

    Raises:
        ValueError: unknown spacing or convention, or num_steps not an integer in [1, :func:`max_num_steps`].
    """
    if spacing not in SPACINGS:
        raise choice_error("spacing", spacing, SPACINGS)
    if convention not in get_args(Convention):
        raise choice_error("convention", convention, get_args(Convention))
    T = diffusion.num_timesteps
    high = max_num_steps(T, spacing, convention)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= high:
        raise ValueError(f"num_steps must be an integer in [1, {high}] for spacing {spacing!r}, got {num_steps!r}")
    table = diffusion.ve_sigmas().cpu()  # (T,)
    start_scale = 1.0
    if spacing == "karras":
        top, bottom = sigma_range(diffusion, sigma_max, sigma_min)
        sigmas = karras_sigmas(bottom, top, num_steps)
        t = diffusion.t_from_ve_sigma(sigmas).cpu()
        if sigma_max is not None:
            start_scale = float(GaussianDiffusion.alpha_sigma_from_ve_sigma(top)[1])
        if convention == "multistep":
            t = t.round()
    else:
        if spacing == "trailing":
            t = _trailing_timesteps(T, num_steps)
        elif convention == "multistep":
            t = _uniform_timesteps(T, num_steps + 1)[:-1].round()
        else:
            t = _uniform_timesteps(T, num_steps) if num_steps > 1 else torch.tensor([T - 1.0], dtype=torch.float64)
        low = t.floor().long().clamp(max=T - 2)
        w = t - low  # 0 for integer t; diffusers' np.interp is linear in sigma
        sigmas = (1 - w) * table[low] + w * table[low + 1]
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    assert (sigmas[1:] < sigmas[:-1]).all(), sigmas  # internal invariant (distinct levels, see max_num_steps)
    integer_t = convention == "multistep" or spacing == "trailing"
    return SolverSchedule(t=t, sigmas=sigmas, integer_t=integer_t, start_scale=start_scale)

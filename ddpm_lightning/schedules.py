"""Beta schedules beta_t, t = 0, ..., T-1, of the forward process
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

Every schedule returns a float64 tensor of shape (T,) with betas in (0, 1); the math is done in float64
because alphas_cumprod = prod(1 - beta) over thousands of steps loses digits in float32 (the diffusion
stores float32 copies). Convention (as in openai/improved-diffusion): index t = 0 is the first noising step,
so alphas_cumprod[0] = 1 - betas[0] < 1 and alphas_cumprod[T-1] is the signal level of the noisiest step.

Use :func:`make_betas` (name + params, validated) from configs; the per-schedule functions are public for
tests and plots.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

ScheduleName = Literal["linear", "cosine", "sigmoid", "polynomial"]
PolynomialPhase = Literal["warmup", "cooloff"]

#: Upper clip on any beta. Rescaled linear/polynomial schedules exceed 1 for small T (T=10: beta_end =
#: 0.02 * 1000 / 10 = 2), and cosine/sigmoid reach alphas_cumprod = 0 at t = T (beta = 1); beta = 1 would
#: make alphas_cumprod exactly 0 and 1 / sqrt(alphas_cumprod) infinite. 0.999 is Nichol & Dhariwal 2021's
#: clip (Sec. 3.2).
MAX_BETA = 0.999

#: The number of steps for which Ho et al. 2020 gave the linear endpoints (1e-4, 0.02); other T rescale them.
REFERENCE_TIMESTEPS = 1000


def _check_num_timesteps(num_timesteps: int) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")


def _rescaled_endpoints(num_timesteps: int, beta_start: float, beta_end: float) -> tuple[float, float]:
    """Endpoints given for T=1000, scaled by 1000/T so that sum(betas) (total noise) does not depend on T."""
    scale = REFERENCE_TIMESTEPS / num_timesteps
    return beta_start * scale, beta_end * scale


def _betas_from_alphas_cumprod(alphas_cumprod: Tensor, max_beta: float) -> Tensor:
    """beta_t = 1 - abar(t+1) / abar(t) from a (T+1,) grid abar(0), ..., abar(T), clipped; (T,)."""
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear schedule of Ho et al. 2020 (Sec. 4): betas evenly spaced from beta_start to beta_end.

    beta_start/beta_end are the values for T=1000; for other T both are multiplied by 1000/T (the
    improved-diffusion convention), then clipped to at most MAX_BETA (T=10 would otherwise give beta_end = 2).

    Returns:
        betas, float64, shape (T,).
    """
    _check_num_timesteps(num_timesteps)
    start, end = _rescaled_endpoints(num_timesteps, beta_start, beta_end)
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64).clamp(max=MAX_BETA)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = MAX_BETA) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17.

    abar(t) = f(t) / f(0), f(t) = cos(((t/T) + s) / (1 + s) * pi/2)^2 on the grid t = 0, ..., T, and
    beta_t = 1 - abar(t+1) / abar(t) clipped at max_beta (the paper's 0.999, avoiding the singularity at t=T).
    The offset s keeps beta small near t = 0.

    Returns:
        betas, float64, shape (T,).
    """
    _check_num_timesteps(num_timesteps)
    t = torch.arange(num_timesteps + 1, dtype=torch.float64)
    f = torch.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return _betas_from_alphas_cumprod(f / f[0], max_beta)


def sigmoid_betas(
    num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = MAX_BETA
) -> Tensor:
    """Sigmoid schedule of Chen 2023 ("On the importance of noise scheduling for diffusion models"), Alg. 1.

    abar(u) = (sigmoid(end/tau) - sigmoid((u (end - start) + start) / tau))
              / (sigmoid(end/tau) - sigmoid(start/tau))
    on u = 0, 1/T, ..., 1 (so abar(0) = 1 and abar(1) = 0), betas from consecutive ratios, clipped at
    max_beta.
    A larger tau flattens the sigmoid; [start, end] picks which part of it is used.

    Returns:
        betas, float64, shape (T,).
    """
    _check_num_timesteps(num_timesteps)
    u = torch.linspace(0.0, 1.0, num_timesteps + 1, dtype=torch.float64)
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alphas_cumprod = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alphas_cumprod(alphas_cumprod, max_beta)


def polynomial_betas(
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    tau: int = 1,
    phase: PolynomialPhase = "warmup",
) -> Tensor:
    """Even-degree polynomial schedule: betas go from beta_start to beta_end along a degree-2*tau polynomial.

    With u = t / (T - 1) in [0, 1] for t = 0, ..., T-1:

    * ``phase="warmup"``:  beta_t = beta_start + (beta_end - beta_start) * u^(2 tau)
      (slow start: betas stay near beta_start for a while, then rise steeply to beta_end);
    * ``phase="cooloff"``: beta_t = beta_start + (beta_end - beta_start) * (1 - (1 - u)^(2 tau))
      (fast start: betas rise steeply, then flatten out at beta_end).

    Both match the linear schedule at the endpoints; tau=1 is quadratic, and larger tau makes the flat part
    longer. warmup lies below the linear schedule for 0 < u < 1, cooloff above it. As in :func:`linear_betas`,
    beta_start/beta_end are the values for T=1000, rescaled by 1000/T, and betas are clipped to MAX_BETA.

    Args:
        tau: a positive integer (the degree 2*tau is even).
        phase: "warmup" or "cooloff".

    Returns:
        betas, float64, shape (T,).
    """
    _check_num_timesteps(num_timesteps)
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be a positive integer (degree 2*tau), got {tau!r}")
    if phase not in get_args(PolynomialPhase):
        raise ValueError(f"unknown phase {phase!r}; choose one of: {', '.join(get_args(PolynomialPhase))}")
    start, end = _rescaled_endpoints(num_timesteps, beta_start, beta_end)
    u = torch.linspace(0.0, 1.0, num_timesteps, dtype=torch.float64)
    ramp = u ** (2 * tau) if phase == "warmup" else 1.0 - (1.0 - u) ** (2 * tau)
    return (start + (end - start) * ramp).clamp(max=MAX_BETA)


#: schedule name -> function(num_timesteps, **params) -> float64 betas (T,)
SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "polynomial": polynomial_betas,
}
assert set(SCHEDULES) == set(get_args(ScheduleName))


def schedule_params(name: str) -> list[str]:
    """The keyword parameters accepted by schedule ``name`` (everything but num_timesteps)."""
    return list(inspect.signature(SCHEDULES[name]).parameters)[1:]


def check_betas(betas: Tensor) -> None:
    """Raise ValueError unless betas (T,) are finite, in (0, 1), and alphas_cumprod > 0 strictly decreases."""
    if betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be a 1-D tensor with >= 2 entries, got shape {tuple(betas.shape)}")
    b = betas.double()
    if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
        bad = b[~(torch.isfinite(b) & (b > 0) & (b < 1))]
        raise ValueError(f"betas must be finite and in (0, 1); got {bad[:5].tolist()} among them")
    alphas_cumprod = torch.cumprod(1.0 - b, dim=0)
    if not (alphas_cumprod[1:] < alphas_cumprod[:-1]).all() or alphas_cumprod[-1] <= 0:
        raise ValueError("alphas_cumprod must be strictly decreasing and positive (it underflowed)")


def make_betas(name: str, num_timesteps: int, **params: float | int | str) -> Tensor:
    """Build and validate the betas of schedule ``name`` for T = num_timesteps steps.

    Args:
        name: one of linear, cosine, sigmoid, polynomial.
        num_timesteps: T >= 2.
        params: keyword parameters of that schedule (see :func:`schedule_params`).

    Returns:
        betas, float64, shape (T,), all in (0, 1), with strictly decreasing alphas_cumprod.

    Raises:
        ValueError: unknown name or parameter, T < 2, or parameters that give an invalid schedule.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    _check_num_timesteps(num_timesteps)
    accepted = schedule_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for schedule {name!r}; accepted: {', '.join(accepted)}"
        )
    betas = SCHEDULES[name](num_timesteps, **params)
    try:
        check_betas(betas)
    except ValueError as err:
        raise ValueError(f"schedule {name!r} with T={num_timesteps} and {params} is invalid: {err}") from None
    return betas

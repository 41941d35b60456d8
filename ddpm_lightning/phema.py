"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3 and
Appendix C): keep a few power-function EMAs of the weights during training, store snapshots of them, and after
training reconstruct the EMA of any length as a least-squares combination of the snapshots.

Conventions:

* ``t`` counts optimizer steps from 1: the power-function EMA after step t is ``ema_t = beta_t ema_{t-1} + (1 -
  beta_t) theta_t`` with ``beta_t = (1 - 1/t)^(gamma + 1)`` (their eq. 3), so ``ema_1 = theta_1``. Its weights over the
  steps tau <= t are ``(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)``: the power profile
  ``p(tau) = (gamma + 1) tau^gamma / t^(gamma+1)`` on [0, t] integrated over each step.
* ``sigma_rel`` is the standard deviation of that profile relative to t (their Sec. 3.1):
  ``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))``.
* A classic EMA of decay ``d`` has an exponential profile of standard deviation ``1 / ln(1/d)`` steps, i.e.
  ``sigma_rel = 1 / (t ln(1/d))`` at step t (exact for the untruncated exponential, t (1 - d) >> 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

#: the two EMA lengths kept during training by default (Karras et al. 2024, Sec. 3.2: 0.05 and 0.10)
DEFAULT_SIGMA_RELS = (0.05, 0.10)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power profile whose relative standard deviation is ``sigma_rel`` (0 < it < 0.289).

    ``sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1`` is the cubic ``gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s
    = 0`` with ``s = sigma_rel^-2``; its largest real root is the one with gamma > -1.
    """
    if not 0 < sigma_rel < math.sqrt(1 / 12):  # gamma -> 0 gives the uniform profile, sigma_rel = 1 / sqrt(12)
        raise ValueError(f"sigma_rel must be in (0, {math.sqrt(1 / 12):.4f}), got {sigma_rel}")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile of exponent ``gamma`` (> -1)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def decay_to_sigma_rel(decay: float, step: int) -> float:
    """``sigma_rel`` at ``step`` of a classic EMA of ``decay`` (std 1 / ln(1/decay) steps of its exponential)."""
    if not 0 < decay < 1 or step < 1:
        raise ValueError(f"decay must be in (0, 1) and step >= 1, got decay {decay}, step {step}")
    return 1.0 / (step * math.log(1.0 / decay))


def power_beta(gamma: float, t: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) of the power-function EMA at optimizer step t >= 1 (their eq. 3)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_dot(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """Inner product of two power profiles ``p_a`` (ending at t_a) and ``p_b`` (ending at t_b), broadcast:

    ``int_0^min(t_a, t_b) (g_a + 1) tau^g_a / t_a^(g_a+1) * (g_b + 1) tau^g_b / t_b^(g_b+1) dtau
    = (g_a + 1)(g_b + 1) m^(g_a+g_b+1) / ((g_a + g_b + 1) t_a^(g_a+1) t_b^(g_b+1))``, m = min(t_a, t_b),
    written with ratios of t so that long runs (t ~ 1e6, gamma ~ 100) stay within float64.
    """
    t_a, t_b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    gamma_a, gamma_b = np.asarray(gamma_a, dtype=np.float64), np.asarray(gamma_b, dtype=np.float64)
    m = np.minimum(t_a, t_b)
    num = (gamma_a + 1) * (gamma_b + 1) * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1)
    return num / ((gamma_a + gamma_b + 1) * m)


def solve_coefficients(
    snapshot_t: Sequence[int], snapshot_gamma: Sequence[float], target_t: int, target_gamma: float
) -> np.ndarray:
    """Weights x (one per snapshot) with ``sum_i x_i p_i`` closest in L2 to the target profile (their Appendix C.2):
    the normal equations ``A x = b``, ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>``, solved by least squares (A can
    be near-singular when snapshots are close together)."""
    t = np.asarray(snapshot_t, dtype=np.float64)
    g = np.asarray(snapshot_gamma, dtype=np.float64)
    if t.ndim != 1 or t.shape != g.shape or t.size == 0:
        raise ValueError("snapshot steps and gammas must be equally long, non-empty 1-D sequences")
    a = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, np.float64(target_t), np.float64(target_gamma))
    return np.linalg.lstsq(a, b, rcond=None)[0]


def combine(states: Sequence[Mapping[str, Tensor]], coefficients: Sequence[float]) -> dict[str, Tensor]:
    """``sum_i c_i states_i`` for each floating-point tensor (float64 accumulation); other tensors from the last."""
    if len(states) != len(coefficients) or not states:
        raise ValueError("one coefficient per snapshot state is needed")
    out: dict[str, Tensor] = {}
    for name, last in states[-1].items():
        if not last.is_floating_point():
            out[name] = last.clone()
            continue
        acc = torch.zeros(last.shape, dtype=torch.float64)
        for state, c in zip(states, coefficients):
            acc += float(c) * state[name].double()
        out[name] = acc.to(last.dtype)
    return out

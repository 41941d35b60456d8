"""Heun and Euler over EDM's noise range, pinned against k-diffusion (Crowson's reference of Karras et al. 2022):
its sample_heun / sample_euler on get_sigmas_karras(n, sigma_min, sigma_max, rho=7), over DiscreteEpsDDPMDenoiser /
DiscreteVDDPMDenoiser wrapping the same network and our alphas_cumprod, whole trajectories to 1e-4.

k-diffusion's package imports its training tools (CLIP, kornia, scikit-image, ...) on ``import k_diffusion``; CI
installs it without them (``pip install --no-deps``, see .ci/run and the Makefile's install target) and we load the
two modules the samplers live in, which need only torch, scipy, torchdiffeq and torchsde (the ``test`` extra).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import types

import pytest
import torch
from solver_cases import SCHEDULES, SHAPE, STEPS, StandIn, make_diffusion, seeded, solve, vp_coefficients

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.spacings import EDM_SIGMA_MAX, EDM_SIGMA_MIN, KARRAS_RHO

TOLERANCE = 1e-4


def _k_diffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """k_diffusion.sampling and k_diffusion.external, without the package's __init__ when its extras are missing."""
    if importlib.util.find_spec("k_diffusion") is None:
        if os.environ.get("CI"):  # CI installs it (.ci/run): its absence is a broken setup, not a skip
            pytest.fail("k-diffusion is not installed: .ci/run's `pip install --no-deps k-diffusion` did not run")
        pytest.skip(
            'k-diffusion is not installed (make install, or pip install --no-deps "k-diffusion==0.1.1.post1")',
            allow_module_level=True,
        )
    try:
        importlib.import_module("k_diffusion")
    except ImportError:  # a --no-deps install: a bare package object whose submodules load on their own
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(importlib.util.find_spec("k_diffusion").submodule_search_locations)
        sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")


K_SAMPLING, K_EXTERNAL = _k_diffusion()


def _k_denoiser(net: StandIn, d: GaussianDiffusion) -> torch.nn.Module:
    """k-diffusion's wrapper of a discrete DDPM network with our float64 alphas_cumprod. It has none for x0
    models: the x0 network goes in as the eps network whose eps is read off its x0 at the same (x_t, t)."""
    alphas_cumprod = 1.0 / (1.0 + d.ve_sigmas() ** 2)
    if d.prediction_type == "v":
        return K_EXTERNAL.DiscreteVDDPMDenoiser(net, alphas_cumprod, quantize=False)
    inner = net
    if d.prediction_type == "x0":

        def inner(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            alpha, sigma = vp_coefficients(d, t)
            return (x - alpha * net(x, t)) / sigma

    return K_EXTERNAL.DiscreteEpsDDPMDenoiser(inner, alphas_cumprod, quantize=False)


def _k_trajectory(solver: str, d: GaussianDiffusion, net: StandIn, noise: torch.Tensor, num_steps: int, rng: tuple):
    """k-diffusion's run from x = noise * sigma_max (its VE start), states mapped to the VP x / sqrt(1 + sigma^2)."""
    model = _k_denoiser(net, d)
    sigma_max, sigma_min = rng
    sigma_max = float(model.sigma_max) if sigma_max is None else min(sigma_max, float(model.sigma_max))
    sigma_min = float(model.sigma_min) if sigma_min is None else max(sigma_min, float(model.sigma_min))
    sigmas = K_SAMPLING.get_sigmas_karras(num_steps, sigma_min, sigma_max, rho=KARRAS_RHO).double()
    states: list[torch.Tensor] = []
    run = {"heun": K_SAMPLING.sample_heun, "euler": K_SAMPLING.sample_euler}[solver]
    with torch.no_grad():
        out = run(model, noise * sigmas[0], sigmas, callback=lambda info: states.append(info["x"]), disable=True)
    ve = torch.stack([*states, out])
    return ve / (1 + sigmas.reshape(-1, 1, 1, 1, 1) ** 2).sqrt()


RANGES = [(EDM_SIGMA_MAX, EDM_SIGMA_MIN), (10.0, 0.05)]  # EDM's (the default) and one inside every schedule's


@pytest.mark.parametrize("sigma_range", RANGES, ids=["edm", "narrow"])
@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize(("schedule", "num_timesteps"), SCHEDULES)
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_trajectory_matches_k_diffusion(
    solver: str, prediction_type: str, schedule: str, num_timesteps: int, num_steps: int, sigma_range: tuple
) -> None:
    d = make_diffusion(prediction_type, schedule, num_timesteps)
    net = StandIn(d)
    noise = torch.randn(SHAPE, generator=seeded(1), dtype=torch.float64)
    expected = _k_trajectory(solver, d, net, noise, num_steps, sigma_range)
    sigma_max, sigma_min = sigma_range
    out, trajectory = solve(
        net, d, SHAPE, solver=solver, num_steps=num_steps, x_T=noise, clip_x0=False, return_trajectory=True,
        sigma_max=sigma_max, sigma_min=sigma_min,
    )  # fmt: skip
    assert trajectory.shape == expected.shape and torch.equal(out, trajectory[-1])
    top = min(sigma_max, float(d.ve_sigmas()[-1]))
    torch.testing.assert_close(trajectory[0], noise * top / math.sqrt(1 + top**2), rtol=1e-12, atol=0)
    assert (trajectory - expected).abs().max().item() <= TOLERANCE


def test_the_default_is_edms_range() -> None:
    """A plain ``sample(sampler="heun")`` is k-diffusion's EDM setting (80 and 0.002, clamped)."""
    d = make_diffusion("eps", "cosine", 1000)
    net = StandIn(d)
    noise = torch.randn(SHAPE, generator=seeded(2), dtype=torch.float64)
    expected = _k_trajectory("heun", d, net, noise, 5, (EDM_SIGMA_MAX, EDM_SIGMA_MIN))
    _, trajectory = solve(net, d, SHAPE, solver="heun", num_steps=5, x_T=noise, clip_x0=False, return_trajectory=True)
    assert (trajectory - expected).abs().max().item() <= TOLERANCE

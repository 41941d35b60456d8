"""Solvers: oracle recovery, convergence on Gaussian data, float32, per-sample generators, NFE accounting and
validation (the equivalence with diffusers: tests/test_solvers_diffusers.py)."""

from __future__ import annotations

import math

import pytest
import torch
from solver_cases import (
    PREDICTION_TYPES,
    SHAPE,
    SOLVERS,
    StandIn,
    make_diffusion,
    nfe,
    output_from_x0,
    seeded,
    solve,
    steps_for_nfe,
    vp_coefficients,
)

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.samplers import DenoiseFn, ddim_sample, guided_denoise_fn
from ddpm_lightning.solvers import (
    dpmpp_2m_sample,
    dpmpp_2m_sde_sample,
    euler_sample,
    heun_sample,
    unipc_sample,
)
from ddpm_lightning.spacings import EDM_SIGMA_MAX, EDM_SIGMA_MIN, SPACINGS, sigma_range, solver_schedule

diffusers = pytest.importorskip("diffusers")


# -- oracle, convergence, float32 ------------------------------------------------------------------------------------
def _point_oracle(d: GaussianDiffusion, x_star: torch.Tensor) -> DenoiseFn:
    """Optimal denoiser when the data is the single point x_star."""
    return lambda x_t, t: output_from_x0(d, x_t, t, x_star)


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_oracle_recovers_the_data_point_along_the_exact_path(solver: str, prediction_type: str, spacing: str) -> None:
    """With the point oracle every solver's data prediction is exact, and the probability-flow ODE path is the
    straight line x_i = alpha_i x* + sigma_i eps_T (eps_T the noise of x_T), which exponential integrators and Euler
    in sigma follow exactly: checked in float64 (in float32 Heun multiplies the rounding of the x0 at sigma_0 ~ 2e3 by
    (sigma_0 - sigma_1) / (2 sigma_1) ~ 200). Multistep "karras" calls the oracle at round(t), off the step's own
    level, and the SDE solver adds noise: there only the float32 sample is checked (it is the last exact x0)."""
    T = 100
    d = make_diffusion(prediction_type, "cosine", T)
    x_star = torch.rand(SHAPE, generator=seeded(123)) * 1.8 - 0.9
    x_T = torch.randn(SHAPE, generator=seeded(1))
    kw = {"solver": solver, "num_steps": 8, "spacing": spacing, "generator": seeded()}
    out = solve(_point_oracle(d, x_star), d, SHAPE, x_T=x_T, **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x_star, atol=1e-5 if prediction_type == "x0" else 3e-4, rtol=0)
    convention = "karras" if solver in ("heun", "euler") else "multistep"
    if solver == "dpmpp_2m_sde" or (spacing == "karras" and convention == "multistep"):
        return
    x_star, x_T = x_star.double(), x_T.double()
    _, trajectory = solve(_point_oracle(d, x_star), d, SHAPE, x_T=x_T, return_trajectory=True, **kw)
    schedule = solver_schedule(d, 8, spacing, convention, EDM_SIGMA_MAX, EDM_SIGMA_MIN)  # the sampler's defaults
    alpha, sigma = d.alpha_sigma_from_ve_sigma(schedule.sigmas.reshape(-1, 1, 1, 1, 1))
    torch.testing.assert_close(trajectory[0], x_T * schedule.start_scale, atol=0, rtol=0)
    eps_T = (trajectory[0] - alpha[0] * x_star) / sigma[0]
    torch.testing.assert_close(trajectory, alpha * x_star + sigma * eps_T, atol=1e-8, rtol=0)


MU, S = 0.3, 0.5


def _gaussian_oracle(d: GaussianDiffusion) -> DenoiseFn:
    """Exact denoiser for data ~ N(MU, S^2 I) at any (fractional) t: E[x0 | x_t] = MU + alpha S^2 / (alpha^2 S^2 +
    sigma^2) (x_t - alpha MU)."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = vp_coefficients(d, t)
        x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x_t.double() - alpha * MU)
        return output_from_x0(d, x_t, t, x0)

    return denoise


def _exact_ode_solution(d: GaussianDiffusion, x_T: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE from x_T at sigma_{T-1} to sigma=0 for N(MU, S^2) data, in closed form: in the VE
    view x_ve - MU scales with sqrt(S^2 + sigma^2) (Karras et al. 2022, eq. 3 with D linear in x_ve)."""
    sigma_max = float(d.ve_sigmas()[-1])
    x_ve = x_T.double() * math.sqrt(1 + sigma_max**2)
    return MU + (x_ve - MU) * S / math.sqrt(S**2 + sigma_max**2)


def test_solvers_converge_to_the_ode_solution_faster_than_ddim() -> None:
    """Error to the exact ODE solution shrinks with num_steps for every deterministic solver: by ~2x per doubling
    for DDIM and Euler (first order), by > 3x for DPM-Solver++(2M), UniPC and Heun (second order, measured 4-13x
    from 20 to 40 steps). At 40 network evaluations the multistep solvers beat DDIM by > 5x (measured 11-20x); Heun,
    at 2 evaluations a step, beats DDIM at the same NFE (39 vs 40) only narrowly, so that is all we ask of it."""
    d = make_diffusion("eps", "linear", 1000)
    denoise = _gaussian_oracle(d)
    x_T = torch.randn((4, 1, 4, 4), generator=seeded(3), dtype=torch.float64)
    exact = _exact_ode_solution(d, x_T)

    def error(name: str, n: int) -> float:
        if name == "ddim":
            out = ddim_sample(denoise, d, x_T.shape, num_steps=n, x_T=x_T, clip_x0=False)
        else:
            out = solve(denoise, d, x_T.shape, solver=name, num_steps=n, x_T=x_T, clip_x0=False)
        return (out - exact).abs().max().item()

    steps = (5, 10, 20, 40)
    errors = {name: [error(name, n) for n in steps] for name in ("ddim", "euler", "dpmpp_2m", "unipc", "heun")}
    for name, errs in errors.items():
        assert all(a > b for a, b in zip(errs, errs[1:])), (name, errors)
        ratio = errs[2] / errs[3]
        assert (ratio > 3) if name in ("dpmpp_2m", "unipc", "heun") else (1.5 < ratio < 2.5), (name, errors)
    for name in ("dpmpp_2m", "unipc"):
        assert errors[name][3] < errors["ddim"][3] / 5, errors
    assert errors["heun"][2] < errors["ddim"][3], errors  # Heun at 20 steps: 39 NFE


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s != "dpmpp_2m_sde"])  # float32 and float64 draws differ
def test_float32_matches_float64(solver: str) -> None:
    d = make_diffusion("v", "cosine", 1000)
    net = StandIn(d)
    x_T = torch.randn(SHAPE, generator=seeded(1), dtype=torch.float64)
    kw = {"solver": solver, "num_steps": 10, "clip_x0": False, "generator": seeded(2)}
    out64 = solve(net, d, SHAPE, x_T=x_T, **kw)
    out32 = solve(net, d, SHAPE, x_T=x_T.float(), **{**kw, "generator": seeded(2)})
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, atol=1e-4, rtol=0)


# -- generators, float t, NFE, validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_generators_make_samples_independent_of_the_batch(solver: str) -> None:
    d = make_diffusion("eps", "linear", 20)
    denoise = lambda x, t: 0.1 * x  # noqa: E731  (any deterministic per-sample function of x_t)

    def gens(idx):
        return [seeded(1000 + i) for i in idx]

    full = solve(denoise, d, (4, 1, 3, 3), solver=solver, num_steps=5, generator=gens(range(4)))
    part = solve(denoise, d, (2, 1, 3, 3), solver=solver, num_steps=5, generator=gens([2, 3]))
    torch.testing.assert_close(full[2:], part, rtol=0, atol=0)
    again = solve(denoise, d, (4, 1, 3, 3), solver=solver, num_steps=5, generator=gens(range(4)))
    assert torch.equal(full, again)


def test_sde_noise_comes_from_the_generator() -> None:
    d = make_diffusion("eps", "linear", 50)
    denoise = lambda x, t: 0.1 * x  # noqa: E731
    x_T = torch.randn(SHAPE, generator=seeded(1))
    a = dpmpp_2m_sde_sample(denoise, d, SHAPE, num_steps=5, x_T=x_T, generator=seeded(0))
    b = dpmpp_2m_sde_sample(denoise, d, SHAPE, num_steps=5, x_T=x_T, generator=seeded(0))
    c = dpmpp_2m_sde_sample(denoise, d, SHAPE, num_steps=5, x_T=x_T, generator=seeded(1))
    assert torch.equal(a, b) and (a - c).abs().max() > 0.01


@pytest.mark.parametrize(
    ("solver", "spacing", "dtype"),
    [("dpmpp_2m", "karras", torch.long), ("unipc", "uniform", torch.long), ("heun", "trailing", torch.long),
     ("heun", "karras", torch.float32), ("euler", "uniform", torch.float32)],
)  # fmt: skip
def test_timestep_dtype_seen_by_the_network(solver: str, spacing: str, dtype: torch.dtype) -> None:
    d = make_diffusion("eps", "linear", 100)
    seen: list[torch.Tensor] = []
    solve(lambda x, t: seen.append(t) or 0.1 * x, d, SHAPE, solver=solver, num_steps=7, spacing=spacing)
    assert {t.dtype for t in seen} == {dtype} and all(t.shape == (SHAPE[0],) for t in seen)
    assert len(seen) == nfe(solver, 7, 100)
    if dtype == torch.float32:
        assert any(t[0] != t[0].round() for t in seen)  # really between the discrete timesteps


def test_classifier_free_guidance_is_inside_denoise_fn() -> None:
    """A guided denoise_fn (one batched [cond; uncond] call per evaluation) solves like the hand-made combination,
    also with the float t of Heun's Karras levels."""
    d = make_diffusion("eps", "linear", 100)

    def model(x, t, y):  # (2B,) labels and t for the guided call
        scale = torch.full((x.shape[0],), 0.5) if y is None else 0.1 * (y + 1).float()
        return x * scale.reshape(-1, 1, 1, 1) + 1e-3 * t.float().reshape(-1, 1, 1, 1)

    y = torch.tensor([0, 2])
    guided = guided_denoise_fn(model, y, 3.0, null_label=5)

    def by_hand(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond = model(x, t, torch.full_like(y, 5))
        return uncond + 3.0 * (model(x, t, y) - uncond)

    for solver in ("heun", "unipc"):
        a = solve(guided, d, SHAPE, solver=solver, num_steps=6, generator=seeded(4))
        b = solve(by_hand, d, SHAPE, solver=solver, num_steps=6, generator=seeded(4))
        torch.testing.assert_close(a, b)


def test_the_unet_takes_float_timesteps() -> None:
    from ddpm_lightning.nn.unet import UNet

    net = UNet(
        in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
        num_groups=4,
    ).eval()  # fmt: skip
    d = make_diffusion("eps", "linear", 100)
    with torch.no_grad():
        out = heun_sample(net, d, SHAPE, num_steps=3, generator=seeded())
        between = net.time_embed(torch.tensor([10.5]))  # the output layer starts at zero: look at the embedding
    assert out.shape == SHAPE and torch.isfinite(out).all()
    assert not torch.equal(between, net.time_embed(torch.tensor([10]))) and torch.isfinite(between).all()


def test_nfe_accounting() -> None:
    T = 1000
    assert [nfe(s, 10, T) for s in ("ddpm", "ddim", "euler", "dpmpp_2m", "dpmpp_2m_sde", "unipc")] == [T] + [10] * 5
    assert nfe("heun", 18, T) == 35 and nfe("heun", 1, T) == 1
    assert steps_for_nfe("heun", 35, T) == 18 and steps_for_nfe("heun", 36, T) == 18
    assert steps_for_nfe("dpmpp_2m", 20, T) == 20 and steps_for_nfe("ddim", 5000, T) == T
    assert steps_for_nfe("ddpm", T, T) == T
    for name in ("ddim", "heun", "unipc"):
        for budget in (1, 2, 7, 35, 100):
            steps = steps_for_nfe(name, budget, T)
            assert nfe(name, steps, T) <= budget < nfe(name, steps + 1, T)
    with pytest.raises(ValueError, match="must be an integer >= 1000"):
        steps_for_nfe("ddpm", 999, T)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        steps_for_nfe("heun", 0, T)
    with pytest.raises(ValueError, match="unknown sampler 'plms'; choose one of: ddpm, ddim, dpmpp_2m"):
        nfe("plms", 10, T)


def test_schedule_layouts() -> None:
    d = make_diffusion("eps", "linear", 1000)
    assert solver_schedule(d, 5, "uniform").t.tolist() == [999, 799, 599, 400, 200]
    assert solver_schedule(d, 5, "trailing").t.tolist() == [999, 799, 599, 399, 199]
    assert solver_schedule(d, 4, "uniform", "karras").t.tolist() == [999, 666, 333, 0]
    assert solver_schedule(d, 1, "uniform", "karras").t.tolist() == [999]  # diffusers would start at t=0
    karras = solver_schedule(d, 10, "karras", "karras")
    sigmas = d.ve_sigmas()
    assert karras.sigmas[0] == pytest.approx(float(sigmas[-1])) and karras.sigmas[-2] == pytest.approx(float(sigmas[0]))
    assert karras.t[0] == pytest.approx(999) and karras.t[-1] == pytest.approx(0.0, abs=1e-9) and karras.sigmas[-1] == 0
    for spacing in SPACINGS:  # the largest allowed step count still has distinct levels
        solver_schedule(d, 999 if spacing == "uniform" else 1000, spacing)


def test_invalid_choices() -> None:
    d = make_diffusion("eps", "linear", 50)
    denoise = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="unknown spacing 'linspace'; choose one of: uniform, trailing, karras"):
        dpmpp_2m_sample(denoise, d, SHAPE, spacing="linspace")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="unknown sampler 'plms'; choose one of: ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc"
    ):
        solve(denoise, d, SHAPE, solver="plms")  # type: ignore[arg-type]
    cases = ((unipc_sample, 50, 49), (euler_sample, 51, 50), (heun_sample, 0, 50), (unipc_sample, 2.5, 49))
    for fn, bad, high in cases:
        with pytest.raises(ValueError, match=rf"num_steps must be an integer in \[1, {high}\]"):
            fn(denoise, d, SHAPE, num_steps=bad, spacing="uniform")
    with pytest.raises(ValueError, match="x_T has shape"):
        euler_sample(denoise, d, SHAPE, num_steps=3, x_T=torch.zeros(1, 1, 8, 8))


def test_edm_sigma_range_is_clamped_to_the_schedule() -> None:
    """karras spacing walks EDM's sigma in [0.002, 80] cut to the schedule's [sigma_0, sigma_{T-1}]; None (or a range
    wider than the schedule's) is the schedule's own end; a sigma_max given scales x_T to its level."""
    d = make_diffusion("eps", "linear", 1000)  # sigma_0 = 0.0100, sigma_{T-1} = 157
    table = d.ve_sigmas()
    edm = solver_schedule(d, 10, "karras", "karras", EDM_SIGMA_MAX, EDM_SIGMA_MIN)
    assert edm.sigmas[0] == pytest.approx(80.0) and edm.sigmas[-2] == pytest.approx(float(table[0]))
    assert edm.start_scale == pytest.approx(80.0 / math.sqrt(1 + 80.0**2), rel=1e-12)
    assert 0 < edm.t[0] < 999  # the network first sees a level between the discrete ones
    whole = solver_schedule(d, 10, "karras", "karras", None, None)
    assert whole.sigmas[0] == pytest.approx(float(table[-1])) and whole.start_scale == 1.0
    assert sigma_range(d, 1e6, 1e-6) == pytest.approx((float(table[-1]), float(table[0])))
    assert sigma_range(d, 10.0, 0.5) == (10.0, 0.5)
    with pytest.raises(ValueError, match=r"leave no range to sample"):
        sigma_range(d, 1e-4, 1e-5)
    assert solver_schedule(d, 10, "uniform", "karras", 10.0, 0.5).sigmas[0] == pytest.approx(float(table[-1]))

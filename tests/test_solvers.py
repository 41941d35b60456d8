"""Solvers: trajectories pinned against diffusers' schedulers, oracle recovery, convergence on Gaussian data,
per-sample generators, NFE accounting and validation."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.samplers import DenoiseFn, ddim_sample, guided_denoise_fn
from ddpm_lightning.sampling import SAMPLERS, SamplingConfig, sample
from ddpm_lightning.schedules import make_betas
from ddpm_lightning.solvers import (
    dpmpp_2m_sample,
    dpmpp_2m_sde_sample,
    euler_sample,
    heun_sample,
    unipc_sample,
)
from ddpm_lightning.spacings import SPACINGS, max_num_steps, solver_schedule

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 1, 8, 8)
PREDICTION_TYPES = ["eps", "x0", "v"]
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
#: (schedule, T): the cosine schedule's last level is extreme (1 / alpha_{T-1} ~ 640 at T=1000); a small T too
SCHEDULES = [("linear", 1000), ("cosine", 1000), ("cosine", 100)]
STEPS = [5, 10, 25]


SOLVERS = tuple(name for name, spec in SAMPLERS.items() if spec.uses_spacing)  # the registry's solvers


def solve(denoise_fn: DenoiseFn, d: GaussianDiffusion, shape, *, solver: str, **kwargs):
    """A solver by its registry name, through the one sampling surface."""
    return sample(denoise_fn, d, shape, sampler=solver, **kwargs)


def nfe(name: str, num_steps: int, num_timesteps: int) -> int:
    return SamplingConfig(sampler=name, num_steps=num_steps).nfe(num_timesteps)


def steps_for_nfe(name: str, budget: int, num_timesteps: int) -> int:
    return SamplingConfig(sampler=name).at_nfe(budget, num_timesteps).num_steps


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _diffusion(prediction_type: str = "eps", schedule: str = "linear", num_timesteps: int = 1000) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas(schedule, num_timesteps), prediction_type=prediction_type)


def _vp_coefficients(d: GaussianDiffusion, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma_vp) (B, 1, 1, 1) float64 at (B,) long or fractional t (log-sigma interpolation)."""
    alpha, sigma = d.alpha_sigma_from_ve_sigma(d.ve_sigma_at(t).reshape(-1, 1, 1, 1))
    return alpha, sigma


def _output_from_x0(d: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The model output in d.prediction_type whose x0 is ``x0`` at (x_t, t), in float64, cast to x_t's dtype."""
    alpha, sigma = _vp_coefficients(d, t)
    x, x0 = x_t.double(), x0.double()
    eps = (x - alpha * x0) / sigma
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[d.prediction_type].to(x_t.dtype)


class _StandIn(torch.nn.Module):
    """A deterministic stand-in network: the exact denoiser of N(0, 0.6^2) data plus a small seeded conv term that
    depends on x and t, output in d.prediction_type. Its x0 stays O(1), as a trained network's does, so float32
    rounding inside diffusers is not amplified by 1 / alpha (up to ~640 at t = T-1 of the cosine schedule)."""

    def __init__(self, d: GaussianDiffusion, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.d = d
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 1, 3, padding=1)
        self.emb = torch.nn.Linear(3, 4)
        self.double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = _vp_coefficients(self.d, t)
        u = t.double()[:, None] / self.d.num_timesteps  # (B, 1)
        emb = self.emb(torch.cat([torch.sin(3 * u), torch.cos(5 * u), u], dim=1))[:, :, None, None]
        x64 = x.double()
        x0 = alpha * 0.36 / (alpha**2 * 0.36 + sigma**2) * x64 + 0.2 * self.conv2(torch.tanh(self.conv1(x64) + emb))
        return _output_from_x0(self.d, x, t, x0)


# -- equivalence with diffusers --------------------------------------------------------------------------------------
def _scheduler(cls_name: str, d: GaussianDiffusion, spacing: str, **kwargs):
    """diffusers scheduler ``cls_name`` with our betas, prediction type and spacing, after set_timesteps."""
    cls = getattr(diffusers, cls_name)
    spacing_kw = {"karras": {"use_karras_sigmas": True}, "trailing": {"timestep_spacing": "trailing"}, "uniform": {}}
    return cls(
        num_train_timesteps=d.num_timesteps,
        trained_betas=d.betas.double().numpy(),
        prediction_type=DIFFUSERS_PREDICTION[d.prediction_type],
        **spacing_kw[spacing],
        **kwargs,
    )


def _prepare(scheduler, d: GaussianDiffusion, num_steps: int, spacing: str, convention: str) -> None:
    """set_timesteps, check that diffusers lays out the same levels and timesteps as :func:`solver_schedule`, then
    hand it our float64 levels.

    diffusers keeps alphas_cumprod and the sigmas in float32; at t = T-1 of the cosine schedule x0 = (x_t - sigma_vp
    eps) / alpha multiplies their rounding by ~640 (1e-4 and more). We give it our float64 alphas_cumprod before
    set_timesteps and the same levels in float64 after it, so that the comparison measures the algorithms.
    """
    scheduler.alphas_cumprod = 1.0 / (1.0 + d.ve_sigmas() ** 2)
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(0)  # diffusers would start at index 1 if its first (rounded) timestep repeats
    ours = solver_schedule(d, num_steps, spacing, convention)
    sigmas, timesteps = ours.sigmas, ours.t
    if type(scheduler).__name__ == "HeunDiscreteScheduler":  # Heun visits every inner level twice
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
    torch.testing.assert_close(scheduler.sigmas.double(), sigmas, rtol=2e-6, atol=0)
    torch.testing.assert_close(scheduler.timesteps.double(), timesteps, rtol=0, atol=1e-3)
    scheduler.sigmas = sigmas


def _diffusers_trajectory(scheduler, net: DenoiseFn, x_T: torch.Tensor, noises: list | None = None) -> torch.Tensor:
    """Run a prepared diffusers scheduler from the VP x_T; returns its states in VP space, (n + 1, B, C, H, W).

    Euler/Heun keep x_ve = x_vp * sqrt(1 + sigma^2): their start is x_T * sqrt(1 + sigma_0^2) (diffusers'
    init_noise_sigma = sigma_0 drops the 1, the signal's share of x_T's variance), scale_model_input maps back.
    Heun's states are taken after each full step; UniPC's are the corrected ones (``last_sample``)."""
    name = type(scheduler).__name__
    ve = name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler")
    x = x_T * (1 + scheduler.sigmas[0] ** 2).sqrt() if ve else x_T.clone()
    states = [x_T]
    timesteps = scheduler.timesteps
    for k, t in enumerate(timesteps):
        output = net(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        kwargs = {} if noises is None else {"variance_noise": noises[min(k, len(noises) - 1)]}
        x = scheduler.step(output, t, x, **kwargs).prev_sample
        if ve and (name == "EulerDiscreteScheduler" or scheduler.state_in_first_order or k == len(timesteps) - 1):
            states.append(x / (1 + scheduler.sigmas[scheduler.step_index] ** 2).sqrt())
        elif name == "UniPCMultistepScheduler" and k > 0:
            states.append(scheduler.last_sample)
        elif not ve and name != "UniPCMultistepScheduler":
            states.append(x)
    if name == "UniPCMultistepScheduler":
        states.append(x)
    return torch.stack(states)


def _x_T(d: GaussianDiffusion, scale: float = 1.0) -> torch.Tensor:
    """x_T ~ N(0, scale^2 I) (float64) whose VE start x_T sqrt(1 + sigma_0^2) is exact in float32: diffusers' Euler
    rounds its state to float32, and at sigma_0 = 2e4 (cosine, T=1000) that rounding (~4e-3) would be carried
    unscaled into a next level of sigma ~ 2."""
    c = math.sqrt(1 + float(d.ve_sigmas()[-1]) ** 2)
    x_T = scale * torch.randn(SHAPE, generator=_gen(1), dtype=torch.float64)
    return (x_T * c).float().double() / c


#: solver -> (diffusers scheduler, its options, our convention)
REFERENCES = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "multistep"),
    "unipc": ("UniPCMultistepScheduler", {}, "multistep"),
    "heun": ("HeunDiscreteScheduler", {}, "karras"),
    "euler": ("EulerDiscreteScheduler", {}, "karras"),
}
TOLERANCE = 1e-4


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(("schedule", "num_timesteps"), SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("solver", list(REFERENCES))
def test_trajectory_matches_diffusers(
    solver: str, prediction_type: str, schedule: str, num_timesteps: int, spacing: str, num_steps: int
) -> None:
    d = _diffusion(prediction_type, schedule, num_timesteps)
    net = _StandIn(d)
    cls_name, options, convention = REFERENCES[solver]
    scheduler = _scheduler(cls_name, d, spacing, **options)
    _prepare(scheduler, d, num_steps, spacing, convention)
    x_T = _x_T(d)
    with torch.no_grad():
        expected = _diffusers_trajectory(scheduler, net, x_T)
    out, trajectory = solve(
        net, d, SHAPE, solver=solver, num_steps=num_steps, spacing=spacing, x_T=x_T, clip_x0=False,
        return_trajectory=True,
    )  # fmt: skip
    assert trajectory.shape == (num_steps + 1, *SHAPE) and torch.equal(out, trajectory[-1])
    assert (trajectory - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(("schedule", "num_timesteps"), SCHEDULES[:2])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_sde_trajectory_matches_diffusers_with_the_same_noise(
    prediction_type: str, schedule: str, num_timesteps: int, spacing: str
) -> None:
    """From a given x_T, SDE-DPM-Solver++(2M) draws one z per step but the last from its generator; we replay the
    same draws into diffusers' variance_noise (its last step multiplies the noise by sigma = 0)."""
    num_steps = 10
    d = _diffusion(prediction_type, schedule, num_timesteps)
    net = _StandIn(d)
    scheduler = _scheduler("DPMSolverMultistepScheduler", d, spacing, algorithm_type="sde-dpmsolver++")
    _prepare(scheduler, d, num_steps, spacing, "multistep")
    x_T = torch.randn(SHAPE, generator=_gen(1), dtype=torch.float64)
    replay = _gen(7)
    noises = [torch.randn(SHAPE, generator=replay, dtype=torch.float64) for _ in range(num_steps - 1)]
    with torch.no_grad():
        expected = _diffusers_trajectory(scheduler, net, x_T, noises)
    _, trajectory = dpmpp_2m_sde_sample(
        net, d, SHAPE, num_steps=num_steps, spacing=spacing, x_T=x_T, generator=_gen(7), clip_x0=False,
        return_trajectory=True,
    )  # fmt: skip
    assert (trajectory - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    ("solver", "cls_name", "options"),
    [
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.0}),
        ("unipc", "UniPCMultistepScheduler", {"thresholding": True, "sample_max_value": 1.0}),
        ("heun", "HeunDiscreteScheduler", {"clip_sample": True}),
    ],
)
def test_clip_x0_matches_diffusers_clipping(solver: str, cls_name: str, options: dict) -> None:
    """clip_x0 = diffusers' clipping of the data prediction (thresholding with max 1 is the plain clamp)."""
    d = _diffusion("eps", "cosine", 1000)
    net = _StandIn(d)
    convention = REFERENCES[solver][2]
    scheduler = _scheduler(cls_name, d, "karras", **{**REFERENCES[solver][1], **options})
    _prepare(scheduler, d, 10, "karras", convention)
    x_T = _x_T(d, scale=2.0)  # wide, so that x0 leaves [-1, 1]
    with torch.no_grad():
        expected = _diffusers_trajectory(scheduler, net, x_T)
    kw = {"num_steps": 10, "spacing": "karras", "x_T": x_T, "return_trajectory": True}
    _, clipped = solve(net, d, SHAPE, solver=solver, clip_x0=True, **kw)
    _, unclipped = solve(net, d, SHAPE, solver=solver, clip_x0=False, **kw)
    assert (clipped - expected).abs().max().item() <= TOLERANCE
    assert (unclipped - expected).abs().max().item() > 0.01  # clipping mattered


# -- oracle, convergence, float32 ------------------------------------------------------------------------------------
def _point_oracle(d: GaussianDiffusion, x_star: torch.Tensor) -> DenoiseFn:
    """Optimal denoiser when the data is the single point x_star."""
    return lambda x_t, t: _output_from_x0(d, x_t, t, x_star)


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
    d = _diffusion(prediction_type, "cosine", T)
    x_star = torch.rand(SHAPE, generator=_gen(123)) * 1.8 - 0.9
    x_T = torch.randn(SHAPE, generator=_gen(1))
    kw = {"solver": solver, "num_steps": 8, "spacing": spacing, "generator": _gen()}
    out = solve(_point_oracle(d, x_star), d, SHAPE, x_T=x_T, **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x_star, atol=1e-5 if prediction_type == "x0" else 3e-4, rtol=0)
    convention = "karras" if solver in ("heun", "euler") else "multistep"
    if solver == "dpmpp_2m_sde" or (spacing == "karras" and convention == "multistep"):
        return
    x_star, x_T = x_star.double(), x_T.double()
    _, trajectory = solve(_point_oracle(d, x_star), d, SHAPE, x_T=x_T, return_trajectory=True, **kw)
    sigmas = solver_schedule(d, 8, spacing, convention).sigmas
    alpha, sigma = d.alpha_sigma_from_ve_sigma(sigmas.reshape(-1, 1, 1, 1, 1))
    eps_T = (x_T - alpha[0] * x_star) / sigma[0]
    torch.testing.assert_close(trajectory, alpha * x_star + sigma * eps_T, atol=1e-8, rtol=0)


MU, S = 0.3, 0.5


def _gaussian_oracle(d: GaussianDiffusion) -> DenoiseFn:
    """Exact denoiser for data ~ N(MU, S^2 I) at any (fractional) t: E[x0 | x_t] = MU + alpha S^2 / (alpha^2 S^2 +
    sigma^2) (x_t - alpha MU)."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = _vp_coefficients(d, t)
        x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x_t.double() - alpha * MU)
        return _output_from_x0(d, x_t, t, x0)

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
    d = _diffusion("eps", "linear", 1000)
    denoise = _gaussian_oracle(d)
    x_T = torch.randn((4, 1, 4, 4), generator=_gen(3), dtype=torch.float64)
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
    d = _diffusion("v", "cosine", 1000)
    net = _StandIn(d)
    x_T = torch.randn(SHAPE, generator=_gen(1), dtype=torch.float64)
    kw = {"solver": solver, "num_steps": 10, "clip_x0": False, "generator": _gen(2)}
    out64 = solve(net, d, SHAPE, x_T=x_T, **kw)
    out32 = solve(net, d, SHAPE, x_T=x_T.float(), **{**kw, "generator": _gen(2)})
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, atol=1e-4, rtol=0)


# -- generators, float t, NFE, validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_generators_make_samples_independent_of_the_batch(solver: str) -> None:
    d = _diffusion("eps", "linear", 20)
    denoise = lambda x, t: 0.1 * x  # noqa: E731  (any deterministic per-sample function of x_t)

    def gens(idx):
        return [_gen(1000 + i) for i in idx]

    full = solve(denoise, d, (4, 1, 3, 3), solver=solver, num_steps=5, generator=gens(range(4)))
    part = solve(denoise, d, (2, 1, 3, 3), solver=solver, num_steps=5, generator=gens([2, 3]))
    torch.testing.assert_close(full[2:], part, rtol=0, atol=0)
    again = solve(denoise, d, (4, 1, 3, 3), solver=solver, num_steps=5, generator=gens(range(4)))
    assert torch.equal(full, again)


def test_sde_noise_comes_from_the_generator() -> None:
    d = _diffusion("eps", "linear", 50)
    denoise = lambda x, t: 0.1 * x  # noqa: E731
    x_T = torch.randn(SHAPE, generator=_gen(1))
    a = dpmpp_2m_sde_sample(denoise, d, SHAPE, num_steps=5, x_T=x_T, generator=_gen(0))
    b = dpmpp_2m_sde_sample(denoise, d, SHAPE, num_steps=5, x_T=x_T, generator=_gen(0))
    c = dpmpp_2m_sde_sample(denoise, d, SHAPE, num_steps=5, x_T=x_T, generator=_gen(1))
    assert torch.equal(a, b) and (a - c).abs().max() > 0.01


@pytest.mark.parametrize(
    ("solver", "spacing", "dtype"),
    [("dpmpp_2m", "karras", torch.long), ("unipc", "uniform", torch.long), ("heun", "trailing", torch.long),
     ("heun", "karras", torch.float32), ("euler", "uniform", torch.float32)],
)  # fmt: skip
def test_timestep_dtype_seen_by_the_network(solver: str, spacing: str, dtype: torch.dtype) -> None:
    d = _diffusion("eps", "linear", 100)
    seen: list[torch.Tensor] = []
    solve(lambda x, t: seen.append(t) or 0.1 * x, d, SHAPE, solver=solver, num_steps=7, spacing=spacing)
    assert {t.dtype for t in seen} == {dtype} and all(t.shape == (SHAPE[0],) for t in seen)
    assert len(seen) == nfe(solver, 7, 100)
    if dtype == torch.float32:
        assert any(t[0] != t[0].round() for t in seen)  # really between the discrete timesteps


def test_classifier_free_guidance_is_inside_denoise_fn() -> None:
    """A guided denoise_fn (one batched [cond; uncond] call per evaluation) solves like the hand-made combination,
    also with the float t of Heun's Karras levels."""
    d = _diffusion("eps", "linear", 100)

    def model(x, t, y):  # (2B,) labels and t for the guided call
        scale = torch.full((x.shape[0],), 0.5) if y is None else 0.1 * (y + 1).float()
        return x * scale.reshape(-1, 1, 1, 1) + 1e-3 * t.float().reshape(-1, 1, 1, 1)

    y = torch.tensor([0, 2])
    guided = guided_denoise_fn(model, y, 3.0, null_label=5)

    def by_hand(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond = model(x, t, torch.full_like(y, 5))
        return uncond + 3.0 * (model(x, t, y) - uncond)

    for solver in ("heun", "unipc"):
        a = solve(guided, d, SHAPE, solver=solver, num_steps=6, generator=_gen(4))
        b = solve(by_hand, d, SHAPE, solver=solver, num_steps=6, generator=_gen(4))
        torch.testing.assert_close(a, b)


def test_the_unet_takes_float_timesteps() -> None:
    from ddpm_lightning.nn.unet import UNet

    net = UNet(
        in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
        num_groups=4,
    ).eval()  # fmt: skip
    d = _diffusion("eps", "linear", 100)
    with torch.no_grad():
        out = heun_sample(net, d, SHAPE, num_steps=3, generator=_gen())
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
    d = _diffusion("eps", "linear", 1000)
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


@pytest.mark.parametrize("num_timesteps", [10, 37, 333])
@pytest.mark.parametrize(("cls_name", "convention"), [("DPMSolverMultistepScheduler", "multistep"),
                                                      ("EulerDiscreteScheduler", "karras")])  # fmt: skip
def test_schedules_match_diffusers_for_odd_sizes(cls_name: str, convention: str, num_timesteps: int) -> None:
    """Timesteps and levels as diffusers lays them out, for sizes where its rounding has ties. Two deliberate
    differences: Euler/Heun with one step start at t=T-1 (diffusers' "uniform" and "karras" start at t=0: its
    linspace(0, T-1, 1) is [0]), and for some (T, n) diffusers' "trailing" np.arange yields an extra step at t=-1,
    which we drop."""
    d = _diffusion("eps", "cosine", num_timesteps)
    extra_steps = 0
    for spacing in SPACINGS:
        high = max_num_steps(num_timesteps, spacing, convention)
        candidates = {1, 2, 3, 6, 7, 41, high // 2 + 1, high - 1, high}  # 41: diffusers' extra step at T=333
        for num_steps in sorted(n for n in candidates if 1 <= n <= high and (n > 1 or convention == "multistep")):
            scheduler = _scheduler(cls_name, d, spacing)
            scheduler.alphas_cumprod = 1.0 / (1.0 + d.ve_sigmas() ** 2)
            scheduler.set_timesteps(num_steps)
            ours = solver_schedule(d, num_steps, spacing, convention)
            n = len(ours)
            if spacing == "trailing" and len(scheduler.timesteps) == n + 1:
                assert scheduler.timesteps[-1] == -1  # diffusers' extra step
                extra_steps += 1
            torch.testing.assert_close(scheduler.timesteps[:n].double(), ours.t, rtol=0, atol=1e-3)
            torch.testing.assert_close(scheduler.sigmas[:n].double(), ours.sigmas[:n], rtol=2e-6, atol=0)
    assert extra_steps == (num_timesteps == 333)  # T=333, n=41 meets the quirk


def test_invalid_choices() -> None:
    d = _diffusion("eps", "linear", 50)
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

"""Solvers pinned against diffusers' schedulers given our betas: whole trajectories, clipping, odd sizes.

diffusers' "karras" spacing (use_karras_sigmas) walks the schedule's whole noise range: ours with sigma_max=None and
sigma_min=None (EDM's narrower default range is pinned against k-diffusion in tests/test_solvers_kdiffusion.py)."""

from __future__ import annotations

import math

import pytest
import torch
from solver_cases import (
    DIFFUSERS_PREDICTION,
    PREDICTION_TYPES,
    SCHEDULES,
    SHAPE,
    STEPS,
    StandIn,
    make_diffusion,
    seeded,
    solve,
)

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.samplers import DenoiseFn
from ddpm_lightning.solvers import (
    dpmpp_2m_sde_sample,
)
from ddpm_lightning.spacings import SPACINGS, max_num_steps, solver_schedule

diffusers = pytest.importorskip("diffusers")


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
    x_T = scale * torch.randn(SHAPE, generator=seeded(1), dtype=torch.float64)
    return (x_T * c).float().double() / c


#: solver -> (diffusers scheduler, its options, our convention)
REFERENCES = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "multistep"),
    "unipc": ("UniPCMultistepScheduler", {}, "multistep"),
    "heun": ("HeunDiscreteScheduler", {}, "karras"),
    "euler": ("EulerDiscreteScheduler", {}, "karras"),
}
TOLERANCE = 1e-4


def full_range(spacing: str) -> dict:
    """The sampling options of the schedule's whole noise range, diffusers' karras spacing (other spacings have it)."""
    return {"sigma_max": None, "sigma_min": None} if spacing == "karras" else {}


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(("schedule", "num_timesteps"), SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("solver", list(REFERENCES))
def test_trajectory_matches_diffusers(
    solver: str, prediction_type: str, schedule: str, num_timesteps: int, spacing: str, num_steps: int
) -> None:
    d = make_diffusion(prediction_type, schedule, num_timesteps)
    net = StandIn(d)
    cls_name, options, convention = REFERENCES[solver]
    scheduler = _scheduler(cls_name, d, spacing, **options)
    _prepare(scheduler, d, num_steps, spacing, convention)
    x_T = _x_T(d)
    with torch.no_grad():
        expected = _diffusers_trajectory(scheduler, net, x_T)
    out, trajectory = solve(
        net, d, SHAPE, solver=solver, num_steps=num_steps, spacing=spacing, x_T=x_T, clip_x0=False,
        return_trajectory=True, **full_range(spacing),
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
    d = make_diffusion(prediction_type, schedule, num_timesteps)
    net = StandIn(d)
    scheduler = _scheduler("DPMSolverMultistepScheduler", d, spacing, algorithm_type="sde-dpmsolver++")
    _prepare(scheduler, d, num_steps, spacing, "multistep")
    x_T = torch.randn(SHAPE, generator=seeded(1), dtype=torch.float64)
    replay = seeded(7)
    noises = [torch.randn(SHAPE, generator=replay, dtype=torch.float64) for _ in range(num_steps - 1)]
    with torch.no_grad():
        expected = _diffusers_trajectory(scheduler, net, x_T, noises)
    _, trajectory = dpmpp_2m_sde_sample(
        net, d, SHAPE, num_steps=num_steps, spacing=spacing, x_T=x_T, generator=seeded(7), clip_x0=False,
        return_trajectory=True, **full_range(spacing),
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
    d = make_diffusion("eps", "cosine", 1000)
    net = StandIn(d)
    convention = REFERENCES[solver][2]
    scheduler = _scheduler(cls_name, d, "karras", **{**REFERENCES[solver][1], **options})
    _prepare(scheduler, d, 10, "karras", convention)
    x_T = _x_T(d, scale=2.0)  # wide, so that x0 leaves [-1, 1]
    with torch.no_grad():
        expected = _diffusers_trajectory(scheduler, net, x_T)
    kw = {"num_steps": 10, "spacing": "karras", "x_T": x_T, "return_trajectory": True, **full_range("karras")}
    _, clipped = solve(net, d, SHAPE, solver=solver, clip_x0=True, **kw)
    _, unclipped = solve(net, d, SHAPE, solver=solver, clip_x0=False, **kw)
    assert (clipped - expected).abs().max().item() <= TOLERANCE
    assert (unclipped - expected).abs().max().item() > 0.01  # clipping mattered


@pytest.mark.parametrize("num_timesteps", [10, 37, 333])
@pytest.mark.parametrize(("cls_name", "convention"), [("DPMSolverMultistepScheduler", "multistep"),
                                                      ("EulerDiscreteScheduler", "karras")])  # fmt: skip
def test_schedules_match_diffusers_for_odd_sizes(cls_name: str, convention: str, num_timesteps: int) -> None:
    """Timesteps and levels as diffusers lays them out, for sizes where its rounding has ties. Two deliberate
    differences: Euler/Heun with one step start at t=T-1 (diffusers' "uniform" and "karras" start at t=0: its
    linspace(0, T-1, 1) is [0]), and for some (T, n) diffusers' "trailing" np.arange yields an extra step at t=-1,
    which we drop."""
    d = make_diffusion("eps", "cosine", num_timesteps)
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

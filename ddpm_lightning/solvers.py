"""Fast ODE/SDE solvers of the reverse process: DPM-Solver++(2M) and its SDE variant, UniPC, and the Euler and Heun
samplers of Karras et al. 2022, free functions over a ``denoise_fn(x_t, t) -> model output`` like the samplers.

Every solver walks noise levels sigma_0 > ... > sigma_{n-1} > sigma_n = 0 of
:func:`~ddpm_lightning.spacings.solver_schedule`, in the variance-exploding view x_t / sqrt(abar_t) = x_0 + sigma eps
(sigma = sqrt((1 - abar) / abar); see the continuous-time block of GaussianDiffusion). x_T ~ N(0, I) sits at
sigma_0 = sigma_{T-1}, and the last step lands on sigma = 0, clean data; "karras" spacing starts lower, at EDM's
sigma_max = 80 (clamped to the schedule's range; x_T scaled to that level), unless sigma_max=None. The results are
pinned against diffusers' schedulers with the same options over the schedule's whole range
(``tests/test_solvers_diffusers.py``), including where diffusers' choices are quirks (see
:func:`~ddpm_lightning.spacings.solver_schedule`), and against k-diffusion over EDM's range
(``tests/test_solvers_kdiffusion.py``).

The timestep t given to denoise_fn is a (B,) long tensor for the multistep solvers (DPM-Solver++, UniPC) and for
"trailing" spacing; Euler and Heun with "uniform" or "karras" spacing call the network between the discrete
timesteps, with a (B,) *float* t in x's dtype, at least float32 (the U-Net's sinusoidal embedding takes it as it
is). The state is always handed to denoise_fn as the VP x_t = alpha x_0 + sigma_vp eps, as in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.samplers import DenoiseFn, Generators, SampleOutput, initial_noise, randn
from ddpm_lightning.spacings import EDM_SIGMA_MAX, EDM_SIGMA_MIN, SolverSchedule, Spacing, solver_schedule


# -- shared step machinery -------------------------------------------------------------------------------------------
def _data_prediction(
    denoise_fn: DenoiseFn, diffusion: GaussianDiffusion, x: Tensor, schedule: SolverSchedule, i: int, clip_x0: bool
) -> Tensor:
    """x0 predicted from the VP state x (B, C, H, W) at level i (one network evaluation), clipped if asked."""
    alpha, sigma = schedule.alpha_sigma(i)
    x0, _ = diffusion.model_output_to_x0_eps_at(denoise_fn(x, schedule.t_batch(i, x)), x, alpha, sigma)
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0


def _run(
    step_fn: Callable[[Tensor, int], Tensor],
    schedule: SolverSchedule,
    shape: Sequence[int],
    x_T: Tensor | None,
    generator: Generators,
    device: torch.device | str | None,
    diffusion: GaussianDiffusion,
    return_trajectory: bool,
    progress: bool,
    name: str,
) -> SampleOutput:
    """Draw x_T (times the schedule's ``start_scale``), apply ``step_fn(x_i, i) -> x_{i+1}`` (VP states) for
    i = 0..n-1 under inference mode."""
    if device is None:
        device = x_T.device if x_T is not None else diffusion.betas.device
    with torch.inference_mode():
        x = initial_noise(shape, x_T, generator, device)
        if schedule.start_scale != 1.0:
            x = x * schedule.start_scale
        trajectory = [x] if return_trajectory else None
        for i in tqdm(range(len(schedule)), desc=name, disable=not progress):
            x = step_fn(x, i)
            if trajectory is not None:
                trajectory.append(x)
        return x if trajectory is None else (x, torch.stack(trajectory))


# -- DPM-Solver++(2M) and its SDE variant ----------------------------------------------------------------------------
def dpmpp_2m_sample(
    denoise_fn: DenoiseFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    num_steps: int = 20,
    spacing: Spacing = "uniform",
    generator: Generators = None,
    device: torch.device | str | None = None,
    clip_x0: bool = True,
    x_T: Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    sigma_max: float | None = EDM_SIGMA_MAX,
    sigma_min: float | None = EDM_SIGMA_MIN,
    sde: bool = False,
) -> SampleOutput:
    """DPM-Solver++(2M) (Lu et al. 2022b, arXiv 2211.01095, Algorithm 2): the deterministic probability-flow ODE,
    multistep second order in the data prediction x0, one network evaluation per step.

    The first step is first order (no previous x0), and so is the last, to sigma=0, which returns that step's x0
    (diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
    final_sigmas_type="zero")).

    Args:
        denoise_fn: (x_t, t) -> model output in diffusion.prediction_type; t is (B,) long (see the module docstring).
        diffusion: the process (schedule buffers on ``device``).
        shape: (B, C, H, W).
        num_steps: steps = network evaluations, in [1, T-1] for "uniform", [1, T] otherwise.
        spacing: "uniform", "trailing" or "karras" (:func:`~ddpm_lightning.spacings.solver_schedule`).
        generator: source of x_T, one for the batch or one per sample; on ``device``.
        device: where to sample; default x_T's device, else the diffusion buffers' device.
        clip_x0: clamp each predicted x0 to [-1, 1] before the solver uses it.
        x_T: starting noise (B, C, H, W); drawn from N(0, I) with ``generator`` if None. A "karras" run cut at
            sigma_max starts from x_T sigma_max / sqrt(1 + sigma_max^2), EDM's prior in the VP state.
        return_trajectory: also return every state.
        progress: show a tqdm bar.
        sigma_max, sigma_min: the noise range of "karras" spacing, clamped to the schedule's (None: the schedule's
            end); default EDM's 80 and 0.002 (:func:`~ddpm_lightning.spacings.solver_schedule`). Other spacings
            ignore them.

    Returns:
        samples (B, C, H, W), or (samples, trajectory), trajectory (num_steps + 1, B, C, H, W): the VP states x_t
        from x_T to the samples.

    ``sde=True`` is :data:`dpmpp_2m_sde_sample`.
    """
    schedule = solver_schedule(diffusion, num_steps, spacing, "multistep", sigma_max, sigma_min)
    history: dict[str, float | Tensor] = {}  # the previous step's x0 and h

    def step(x: Tensor, i: int) -> Tensor:
        x0 = _data_prediction(denoise_fn, diffusion, x, schedule, i, clip_x0)
        if schedule.sigma(i + 1) == 0:
            return x0  # the first-order step to sigma = 0 lands on x0 (diffusers: lower_order_final, final sigma 0)
        (_, sigma_s), (alpha_t, sigma_t) = schedule.alpha_sigma(i), schedule.alpha_sigma(i + 1)
        h = schedule.log_snr(i + 1) - schedule.log_snr(i)
        d = x0
        if i > 0:  # second order: D = x0_i + (x0_i - x0_{i-1}) / (2 r), r = h_{i-1} / h_i (Algorithm 2)
            d = x0 + (x0 - history["x0"]) * (h / (2 * history["h"]))
        history.update(x0=x0, h=h)
        if not sde:  # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D (Algorithm 2)
            return (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
        # SDE-DPM-Solver++(2M): x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D
        #                            + sigma_t sqrt(1 - e^{-2h}) z  (diffusers' "sde-dpmsolver++", midpoint)
        noise = randn(x.shape, generator, x.device, x.dtype)
        return (
            (sigma_t / sigma_s * math.exp(-h)) * x
            - alpha_t * math.expm1(-2 * h) * d
            + sigma_t * math.sqrt(-math.expm1(-2 * h)) * noise
        )

    name = "DPM-Solver++(2M) SDE" if sde else "DPM-Solver++(2M)"
    return _run(step, schedule, shape, x_T, generator, device, diffusion, return_trajectory, progress, name)


#: :func:`dpmpp_2m_sample` with sde=True.
#: SDE-DPM-Solver++(2M), the multistep data-prediction solver of the reverse SDE (Lu et al. 2022b), as diffusers'
#: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint"). Each
#: step but the last adds sigma_t sqrt(1 - e^{-2h}) z, z ~ N(0, I) drawn with ``generator`` (per sample when it
#: is a list) after x_T, one draw per step; the last step, to sigma=0, returns its x0 and draws nothing.
dpmpp_2m_sde_sample = partial(dpmpp_2m_sample, sde=True)


# -- UniPC -----------------------------------------------------------------------------------------------------------
def _unic_bh2_rhos(h: float, r: float | None) -> tuple[float, float]:
    """Corrector weights (rho_prev, rho_t) of UniC with B(h) = e^h - 1 ("bh2"), data prediction (hh = -h).

    r = None: UniC-1, weights (0, 1/2) as diffusers hard-codes. Else UniC-2 with r = (lambda_{i-2} - lambda_{i-1}) / h:
    the solution of [[1, 1], [r, 1]] rho = [g_1, 2 g_2] / B(h), g_1 = (e^hh - 1)/hh - 1, g_2 = g_1/hh - 1/2
    (Zhao et al. 2023, arXiv 2302.04867, the order conditions of UniC-p; diffusers' multistep_uni_c_bh_update).
    """
    if r is None:
        return 0.0, 0.5
    hh = -h
    b_h = math.expm1(hh)
    g1 = math.expm1(hh) / hh - 1.0
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / b_h, 2.0 * g2 / b_h
    rho_prev = (b1 - b2) / (1.0 - r)
    return rho_prev, b1 - rho_prev


def unipc_sample(
    denoise_fn: DenoiseFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    num_steps: int = 20,
    spacing: Spacing = "uniform",
    generator: Generators = None,
    device: torch.device | str | None = None,
    clip_x0: bool = True,
    x_T: Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    sigma_max: float | None = EDM_SIGMA_MAX,
    sigma_min: float | None = EDM_SIGMA_MIN,
) -> SampleOutput:
    """UniPC (Zhao et al. 2023, arXiv 2302.04867): the UniP-2 predictor and UniC corrector with B(h) = e^h - 1
    ("bh2"), data prediction, as diffusers' UniPCMultistepScheduler defaults (solver_order=2, predict_x0=True,
    lower_order_final=True, disable_corrector=[], final sigma 0).

    One network evaluation per step: the x0 predicted at the predictor's output x_{i+1} both corrects x_{i+1}
    (UniC, raising the order by one for free) and drives the next predictor. Orders: the predictor is first order on
    the first step (no history) and the last (to sigma=0, which returns the last x0: the final corrector changes
    nothing there); the corrector uses the order of the predictor it corrects.
    Args and returns as :func:`dpmpp_2m_sample`; the trajectory holds the corrected states.
    """
    schedule = solver_schedule(diffusion, num_steps, spacing, "multistep", sigma_max, sigma_min)
    n = len(schedule)
    state: dict[str, Tensor] = {}  # "x0": x0 at the current level, "x0_prev": the one before

    def predictor(x: Tensor, i: int, order: int) -> Tensor:
        """UniP from the (corrected) x at level i to level i+1, order 1 or 2."""
        (_, sigma_s), (alpha_t, sigma_t) = schedule.alpha_sigma(i), schedule.alpha_sigma(i + 1)
        h = schedule.log_snr(i + 1) - schedule.log_snr(i)
        x_next = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * state["x0"]
        if order == 2:  # rho = 1/2 on D1 = (x0_{i-1} - x0_i) / r, r = (lambda_{i-1} - lambda_i) / h
            r = (schedule.log_snr(i - 1) - schedule.log_snr(i)) / h
            x_next = x_next - alpha_t * math.expm1(-h) * 0.5 * (state["x0_prev"] - state["x0"]) / r
        return x_next

    def corrector(x: Tensor, i: int, order: int, x0_new: Tensor) -> Tensor:
        """UniC: redo the step from the corrected x at level i to i+1 with x0_new, the x0 at the predicted x_{i+1}."""
        (_, sigma_s), (alpha_t, sigma_t) = schedule.alpha_sigma(i), schedule.alpha_sigma(i + 1)
        h = schedule.log_snr(i + 1) - schedule.log_snr(i)
        r = (schedule.log_snr(i - 1) - schedule.log_snr(i)) / h if order == 2 else None
        rho_prev, rho_t = _unic_bh2_rhos(h, r)
        x0 = state["x0"]
        correction = rho_t * (x0_new - x0)
        if r is not None:
            correction = correction + rho_prev * (state["x0_prev"] - x0) / r
        return (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * (x0 + correction)

    def step(x: Tensor, i: int) -> Tensor:
        if i == 0:
            state["x0"] = _data_prediction(denoise_fn, diffusion, x, schedule, 0, clip_x0)
        order = 1 if i == 0 or i == n - 1 else 2  # warm-up, and lower_order_final
        x_next = predictor(x, i, order)
        if i == n - 1:
            return x_next  # = x0 at sigma = 0
        x0_new = _data_prediction(denoise_fn, diffusion, x_next, schedule, i + 1, clip_x0)
        x_next = corrector(x, i, order, x0_new)
        state["x0_prev"], state["x0"] = state["x0"], x0_new
        return x_next

    return _run(step, schedule, shape, x_T, generator, device, diffusion, return_trajectory, progress, "UniPC")


# -- Euler and Heun (Karras et al. 2022) -----------------------------------------------------------------------------
def heun_sample(
    denoise_fn: DenoiseFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    num_steps: int = 18,
    spacing: Spacing = "karras",
    generator: Generators = None,
    device: torch.device | str | None = None,
    clip_x0: bool = True,
    x_T: Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    sigma_max: float | None = EDM_SIGMA_MAX,
    sigma_min: float | None = EDM_SIGMA_MIN,
    heun: bool = True,
) -> SampleOutput:
    """Heun's 2nd-order sampler of Karras et al. 2022 (EDM, Algorithm 1, deterministic: S_churn = 0) on the discrete
    model's noise levels; 2 num_steps - 1 network evaluations (the last step,
    to sigma = 0, is Euler). The default 18 steps (35 evaluations) is EDM's CIFAR-10 setting, and so is the default
    noise range, sigma from 80 down to 0.002 (clamped to the schedule's), pinned against k-diffusion's sample_heun
    over get_sigmas_karras (``tests/test_solvers_kdiffusion.py``); sigma_max=None, sigma_min=None run the schedule's
    whole range, as diffusers' HeunDiscreteScheduler (``tests/test_solvers_diffusers.py``).

    denoise_fn gets a float (B,) t for "uniform" and "karras" spacing (between the discrete timesteps), long for
    "trailing". Args and returns as :func:`dpmpp_2m_sample`, with num_steps in [1, T].

    ``heun=False`` is :data:`euler_sample`. How the steps are computed: Karras et al. 2022 Algorithm 1 (S_churn =
    0): Euler / Heun steps in sigma on dx_ve/dsigma = (x_ve - x0) / sigma
    (eq. 3), x_ve = x / alpha, written in the VP state with the data prediction so that no term grows with sigma.

    With the slope d = (x_ve - x0) / sigma, the Euler step x_ve' = x_ve + (sigma' - sigma) d is the convex combination
    (sigma'/sigma) x_ve + (1 - sigma'/sigma) x0; in VP, x' = (sigma_vp'/sigma_vp) x + alpha' (1 - sigma'/sigma) x0
    (which is DDIM on this grid). Heun's average of d and d' = (x_ve' - x0') / sigma' adds
    (sigma - sigma') / (2 sigma') (x0' - x0) to x_ve'. The slope form would subtract numbers ~sigma_0 |x_T| (2e4 for
    the cosine schedule at T=1000) and, in float32, lose 1e-2 of the state on a first step down to sigma ~ 5.
    """
    schedule = solver_schedule(diffusion, num_steps, spacing, "karras", sigma_max, sigma_min)

    def step(x: Tensor, i: int) -> Tensor:
        sigma, sigma_next = schedule.sigma(i), schedule.sigma(i + 1)
        (_, sigma_vp), (alpha_next, sigma_vp_next) = schedule.alpha_sigma(i), schedule.alpha_sigma(i + 1)
        x0 = _data_prediction(denoise_fn, diffusion, x, schedule, i, clip_x0)
        x_next = (sigma_vp_next / sigma_vp) * x + alpha_next * (1 - sigma_next / sigma) * x0  # Algorithm 1, line 5
        if heun and sigma_next > 0:  # second-order correction (lines 6-8); the step to sigma=0 stays Euler
            x0_next = _data_prediction(denoise_fn, diffusion, x_next, schedule, i + 1, clip_x0)
            x_next = x_next + alpha_next * (sigma - sigma_next) / (2 * sigma_next) * (x0_next - x0)
        return x_next

    return _run(step, schedule, shape, x_T, generator, device, diffusion, return_trajectory, progress,
                "Heun" if heun else "Euler")  # fmt: skip


#: Euler steps on the same sigmas (Karras et al. 2022, Algorithm 1 without the correction): :func:`heun_sample`
#: with heun=False, 50 steps by default.
euler_sample = partial(heun_sample, heun=False, num_steps=50)

"""Samplers: free functions of a ``denoise_fn(x_t, t) -> model output`` callable and a GaussianDiffusion.

They never see the network; classifier-free guidance is one more wrapper (:func:`guided_denoise_fn`) that
turns a label-conditional ``model(x, t, y)`` into a ``denoise_fn``. All randomness comes from the explicit
``generator`` (same seed, same device -> identical samples); sampling runs under ``torch.inference_mode()``.

Timestep convention as in :mod:`ddpm_lightning.diffusion`: t in {0, ..., T-1}, t=0 is one step of noise,
and the step taken from t=0 lands on clean data (no noise is added there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm_lightning.diffusion import GaussianDiffusion, VarianceType, extract

#: (x_t (B, C, H, W), t (B,) long) -> raw model output (B, C, H, W) in diffusion.prediction_type
DenoiseFn = Callable[[Tensor, Tensor], Tensor]

SampleOutput = Tensor | tuple[Tensor, Tensor]
#: one generator for the whole batch, or one per sample: then sample i's noise depends on its own generator only,
#: so a sample is the same whatever batch (or DDP rank) it is drawn in
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int], generator: Generators, device: torch.device | str | None, dtype: torch.dtype | None = None
) -> Tensor:
    """N(0, I) noise of ``shape`` (B, ...): from one generator, or row i from ``generator[i]``."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def initial_noise(
    shape: Sequence[int],
    x_T: Tensor | None,
    generator: Generators,
    device: torch.device | str | None,
) -> Tensor:
    """x_T (B, C, H, W): the given one, or N(0, I) drawn with ``generator`` on ``device``."""
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        return x_T.to(device) if device is not None else x_T
    return randn(shape, generator, device)


def _finish(x: Tensor, trajectory: list[Tensor] | None) -> SampleOutput:
    return x if trajectory is None else (x, torch.stack(trajectory))


def ddpm_sample(
    denoise_fn: DenoiseFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    generator: Generators = None,
    device: torch.device | str | None = None,
    variance: VarianceType = "fixed_small",
    clip_x0: bool = True,
    x_T: Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> SampleOutput:
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2).

    Each step predicts x_0 from the model output (clipped to [-1, 1] if ``clip_x0``) and draws
    x_{t-1} ~ N(mu-tilde_t(x_0, x_t), sigma_t^2 I), mu-tilde from the posterior q(x_{t-1} | x_t, x_0) (eq. 7).

    Args:
        denoise_fn: (x_t, t) -> model output in diffusion.prediction_type.
        diffusion: the process (schedule buffers on ``device``).
        shape: (B, C, H, W).
        generator: source of x_T and of the per-step noise, one for the batch or one per sample; on ``device``.
        device: where to sample; default x_T's device, else the diffusion buffers' device.
        variance: sigma_t^2, "fixed_small" (beta-tilde_t) or "fixed_large" (beta_t).
        clip_x0: clamp predicted x_0 to the data range [-1, 1].
        x_T: starting noise (B, C, H, W); drawn from N(0, I) with ``generator`` if None.
        return_trajectory: also return every x_t.
        progress: show a tqdm bar.

    Returns:
        samples (B, C, H, W), or (samples, trajectory), trajectory (T + 1, B, C, H, W) from x_T to samples.
    """
    log_variance_table = diffusion.reverse_log_variance(variance)
    if device is None:
        device = x_T.device if x_T is not None else diffusion.betas.device
    with torch.inference_mode():
        x = initial_noise(shape, x_T, generator, device)
        trajectory = [x] if return_trajectory else None
        steps = range(diffusion.num_timesteps - 1, -1, -1)
        for i in tqdm(steps, desc="DDPM", disable=not progress):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            x0, _ = diffusion.model_output_to_x0_eps(denoise_fn(x, t), x, t)
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
            mean, _, _ = diffusion.q_posterior(x0, x, t)
            if i > 0:
                noise = randn(x.shape, generator, device, x.dtype)
                x = mean + (0.5 * extract(log_variance_table, t, x.shape)).exp() * noise
            else:
                x = mean  # t=0: mu-tilde_0 = x_0, and no noise (Algorithm 2, line 3: z = 0 if t = 1)
            if trajectory is not None:
                trajectory.append(x)
        return _finish(x, trajectory)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """The DDIM sub-sequence tau, (num_steps,) long, strictly decreasing.

    Evenly spaced over [0, T-1] and rounded ("linspace"/"trailing" spacing): always starts at T-1 (the
    level of x_T ~ N(0, I)) and, for num_steps >= 2, ends at 0; num_steps = 1 is the single step [T-1]. As the
    spacing (T-1)/(num_steps-1) is >= 1, the rounded steps are unique; num_steps = T gives every step.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_timesteps}], got {num_steps!r}")
    if num_steps == 1:
        return torch.tensor([num_timesteps - 1])
    steps = torch.linspace(num_timesteps - 1, 0, num_steps, dtype=torch.float64).round().long()
    assert (steps[1:] < steps[:-1]).all(), steps  # internal invariant, see docstring
    return steps


def ddim_sample(
    denoise_fn: DenoiseFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: Generators = None,
    device: torch.device | str | None = None,
    clip_x0: bool = True,
    x_T: Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> SampleOutput:
    """DDIM sampling (Song et al. 2021) over ``num_steps`` steps of :func:`ddim_timesteps`.

    From step tau_i to tau_{i+1} (abar_prev = 1 after t=0), eq. 12:
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with eq. 16
    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev).
    eta = 0 is the deterministic DDIM; eta = 1 with num_steps = T is DDPM with "fixed_small" variance. When
    ``clip_x0``, eps is re-derived from the clipped x0 (as diffusers and improved-diffusion do), so the step
    stays consistent with x_t.

    Args: as :func:`ddpm_sample`, plus num_steps in [1, T] and eta >= 0.

    Returns:
        samples (B, C, H, W), or (samples, trajectory) with trajectory (num_steps + 1, B, C, H, W).
    """
    timesteps = ddim_timesteps(diffusion.num_timesteps, num_steps)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if device is None:
        device = x_T.device if x_T is not None else diffusion.betas.device
    alphas_cumprod = diffusion.alphas_cumprod.to(device)
    # abar of the step each tau_i lands on, (num_steps,); the step from the last tau (0, or T-1 if
    # num_steps=1) lands on clean data, abar = 1
    alphas_cumprod_prev = torch.cat([alphas_cumprod[timesteps[1:].to(device)], alphas_cumprod.new_ones(1)])
    with torch.inference_mode():
        x = initial_noise(shape, x_T, generator, device)
        trajectory = [x] if return_trajectory else None
        for i, step_t in enumerate(tqdm(timesteps.tolist(), desc="DDIM", disable=not progress)):
            t = torch.full((x.shape[0],), step_t, device=device, dtype=torch.long)
            x0, eps = diffusion.model_output_to_x0_eps(denoise_fn(x, t), x, t)
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
                eps = diffusion.predict_eps_from_x0(x, t, x0)
            step = torch.full_like(t, i)
            abar = extract(alphas_cumprod, t, x.shape)
            abar_prev = extract(alphas_cumprod_prev, step, x.shape)
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and i < len(timesteps) - 1:  # sigma = 0 on the last step (abar_prev = 1)
                x = x + sigma * randn(x.shape, generator, device, x.dtype)
            if trajectory is not None:
                trajectory.append(x)
        return _finish(x, trajectory)


def guided_denoise_fn(
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    y: Tensor | None,
    guidance_scale: float,
    null_label: int,
    guide_at: Callable[[Tensor], Tensor] | None = None,
) -> DenoiseFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): output_uncond + w (output_cond - output_uncond).

    The combination is applied to the raw output whatever the prediction type (eps, x0 and v are all affine in
    each other at fixed x_t, so guiding one guides the others the same way).

    Args:
        model: (x (B, C, H, W), t (B,), y (B,) long or None) -> output (B, C, H, W).
        y: (B,) class labels, or None for an unconditional model call model(x, t, None) (no guidance).
        guidance_scale: w. w = 1: purely conditional (one forward pass); w = 0: purely unconditional (one pass
            with y = null_label); otherwise one batched forward of [cond; uncond] (2B).
        null_label: the label index the model was trained with for "no class".
        guide_at: t (B,) -> (B,) bool, where to guide (a limited guidance interval,
            :meth:`~ddpm_lightning.sampling.SamplingConfig.guide_at`); elsewhere the conditional output, and a step
            guided nowhere is one conditional pass. None: guide at every t.

    Returns:
        denoise_fn(x_t, t) -> guided output (B, C, H, W).
    """
    if y is None:
        return lambda x, t: model(x, t, None)
    if guidance_scale == 1:
        return lambda x, t: model(x, t, y)
    y_null = torch.full_like(y, null_label)
    if guidance_scale == 0:
        return lambda x, t: model(x, t, y_null)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        inside = None if guide_at is None else guide_at(t)
        if inside is not None and not bool(inside.any()):
            return model(x, t, y)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))  # (2B, C, H, W)
        cond, uncond = out.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        if inside is None or bool(inside.all()):
            return guided
        return torch.where(inside.view(-1, *[1] * (guided.dim() - 1)), guided, cond)

    return denoise

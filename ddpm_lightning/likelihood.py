"""The variational bound on the negative log-likelihood of a diffusion model, in bits per dimension.

Ho et al. 2020, eq. 5 and Sec. 3.3 (improved-diffusion's ``calc_bpd_loop``): for one image x_0,

    -log p(x_0) <= L_T + sum_{t=1}^{T-1} L_t + L_0, with (in this package's t = 0..T-1 indexing)
    L_T = KL(q(x_{T-1} | x_0) || N(0, I))                          the prior term, no network
    L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),  t >= 1    Gaussians, closed form
    L_0 = -log p(x_0 | x_1)                                         the discretized Gaussian decoder (eq. 13)

p(x_{t-1} | x_t) = N(mu-tilde_t(x0_hat, x_t), sigma_t^2 I): the posterior mean at the network's x_0 (eps, x0 or v
models alike) and a fixed variance, "fixed_large" (beta_t, improved-diffusion's choice for fixed-variance models)
or "fixed_small" (beta-tilde_t); at t = 0 both use beta-tilde_1 (see
:meth:`~ddpm_lightning.diffusion.GaussianDiffusion.reverse_log_variance`). Each L_t is estimated at one x_t drawn
with a given noise, so the bound of an image is reproducible from its noise. Convention: data on 256 levels in
[-1, 1] (bins of width 2/255, the outer ones open), so the number is the NLL of the 8-bit data in bits per
dimension, as Ho et al. 2020 Table 1 reports it (it bounds the dequantised density's NLL from below).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ddpm_lightning.diffusion import GaussianDiffusion, VarianceType, extract

#: half the width of one of the 256 bins of 8-bit data scaled to [-1, 1] (Ho et al. 2020, eq. 13)
BIN_HALF_WIDTH = 1.0 / 255.0
#: the floor of a bin's probability before its log (improved-diffusion's 1e-12)
MIN_BIN_PROBABILITY = 1e-12


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(the bin of x) under N(mean, e^(2 log_scale)), elementwise (Ho et al. 2020, eq. 13).

    x lies on the 256 levels of [-1, 1]: the bin of x is [x - 1/255, x + 1/255], the first one open to -inf and the
    last to +inf. Computed with the exact normal CDF (torch.special.ndtr) in float64.
    """
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + BIN_HALF_WIDTH)
    lower = inv_std * (x - mean - BIN_HALF_WIDTH)
    log_below_upper = torch.special.log_ndtr(upper)  # the first bin: P(X <= x + 1/255)
    log_above_lower = torch.special.log_ndtr(-lower)  # the last bin: P(X > x - 1/255)
    inner = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=MIN_BIN_PROBABILITY).log()
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, inner))


def prior_kl(diffusion: GaussianDiffusion, x_start: Tensor) -> Tensor:
    """L_T = KL(q(x_{T-1} | x_0) || N(0, I)) of each image (B, ...), summed over its dimensions: (B,) nats."""
    t = torch.full((x_start.shape[0],), diffusion.num_timesteps - 1, device=x_start.device, dtype=torch.long)
    mean = extract(diffusion.sqrt_alphas_cumprod, t, x_start.shape).double() * x_start.double()
    logvar = extract(1.0 - diffusion.alphas_cumprod.double(), t, x_start.shape).log()
    kl = normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))
    return kl.flatten(1).sum(1)


def bound_terms(
    diffusion: GaussianDiffusion,
    model_output: Tensor,
    x_start: Tensor,
    x_t: Tensor,
    t: Tensor,
    variance: VarianceType = "fixed_large",
    clip_x0: bool = False,
) -> Tensor:
    """L_t of each row (B,) nats: the Gaussian KL for t >= 1, the decoder's -log p(x_0 | x_1) for t = 0.

    Args:
        model_output: the network's output (B, ...) at (x_t, t), in ``diffusion.prediction_type``.
        x_start: the data x_0 (B, ...) on the 256 levels of [-1, 1]; x_t: q_sample(x_start, t, noise).
        t: (B,) long timesteps in {0, ..., T-1}.
        variance: sigma_t^2 of p(x_{t-1} | x_t), "fixed_large" or "fixed_small".
        clip_x0: clamp the network's x_0 to [-1, 1] before the posterior mean (off: the model as trained).
    """
    x0_hat, _ = diffusion.model_output_to_x0_eps(model_output.double(), x_t.double(), t)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    model_mean, _, _ = diffusion.q_posterior(x0_hat, x_t.double(), t)
    model_logvar = extract(diffusion.reverse_log_variance(variance), t, x_t.shape).double()
    true_mean, _, true_logvar = diffusion.q_posterior(x_start.double(), x_t.double(), t)
    kl = normal_kl(true_mean, true_logvar.double(), model_mean, model_logvar).flatten(1).sum(1)
    decoder_nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_logvar).flatten(1).sum(1)
    return torch.where(t == 0, decoder_nll, kl)


def variational_bound(
    denoise_fn: Callable[[Tensor, Tensor], Tensor],
    diffusion: GaussianDiffusion,
    x_start: Tensor,
    noise: Tensor,
    variance: VarianceType = "fixed_large",
    clip_x0: bool = False,
    batch_size: int = 250,
) -> tuple[Tensor, Tensor]:
    """The bound's terms for one image: (terms (T,) nats, L_0 .. L_{T-1} as :func:`bound_terms`; prior L_T, nats).

    Args:
        denoise_fn: (x_t (B, C, H, W), t (B,) long) -> network output; a conditional model's label is inside it.
        x_start: one image (C, H, W) on the 256 levels of [-1, 1].
        noise: (T, C, H, W), the noise of x_t at each t (fixed noise: a reproducible bound).
        batch_size: timesteps per network call: T terms in ceil(T / batch_size) calls.
    """
    T = diffusion.num_timesteps
    if noise.shape != (T, *x_start.shape):
        raise ValueError(f"noise must have shape {(T, *x_start.shape)}, got {tuple(noise.shape)}")
    terms = []
    with torch.inference_mode():
        for start in range(0, T, batch_size):
            t = torch.arange(start, min(start + batch_size, T), device=x_start.device)
            x0 = x_start.expand(t.shape[0], *x_start.shape)
            x_t = diffusion.q_sample(x0, t, noise[start : start + t.shape[0]])
            terms.append(bound_terms(diffusion, denoise_fn(x_t, t), x0, x_t, t, variance, clip_x0))
        prior = prior_kl(diffusion, x_start[None])[0]
    return torch.cat(terms), prior


def bits_per_dim(terms: Tensor, prior: Tensor, num_dims: int) -> Tensor:
    """The bound (prior + sum of the T terms, nats) per dimension in bits: (sum_t L_t + L_T) / (D ln 2)."""
    return (terms.sum(-1) + prior) / (num_dims * math.log(2.0))

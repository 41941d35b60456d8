"""The Gaussian diffusion process of Ho et al. 2020 ("DDPM"): schedule buffers, forward noising, the
eps / x0 / v conversions, the posterior q(x_{t-1} | x_t, x_0) and the training loss. It owns no network:
the loss takes any ``denoise_fn(x_t, t) -> model output`` callable.

Conventions (as openai/improved-diffusion):

* ``t`` is an integer index in {0, ..., T-1}, a (B,) long tensor; t=0 means one step of noise, so
  alphas_cumprod[0] = 1 - betas[0] and the "previous" level of t=0 is clean data (alphas_cumprod_prev[0] = 1).
* images are (B, C, H, W) (any (B, ...) works) in [-1, 1].
* the buffers are computed in float64 and stored as float32, non-persistent: they derive from the betas, which
  derive from hyperparameters, so checkpoints need not carry them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from ddpm_lightning.schedules import check_betas

PredictionType = Literal["eps", "x0", "v"]
#: sigma_t^2 of the DDPM reverse step (Ho et al. 2020 Sec. 3.2): "fixed_small" = posterior variance
#: beta-tilde_t (optimal for deterministic x_0), "fixed_large" = beta_t (optimal for x_0 ~ N(0, I))
VarianceType = Literal["fixed_small", "fixed_large"]
#: how training draws t: "uniform" over {0, ..., T-1} (Ho et al. 2020, Algorithm 1), or "lognormal": EDM's training
#: noise levels (Karras et al. 2022, Table 1: ln sigma ~ N(P_mean, P_std^2)) on the VE noise level
#: sigma = sqrt((1 - abar) / abar) = exp(-logSNR / 2), mapped to the nearest discrete t through log sigma
TimestepSampling = Literal["uniform", "lognormal"]
#: EDM's P_mean and P_std (Karras et al. 2022, Table 1)
EDM_LOGNORMAL_MEAN, EDM_LOGNORMAL_STD = -1.2, 1.2


def extract(a: Tensor, t: Tensor, x_shape: Sequence[int]) -> Tensor:
    """Index a per-timestep table and reshape for broadcasting against a batch.

    Args:
        a: (T,) table, e.g. a schedule buffer.
        t: (B,) integer timesteps in {0, ..., T-1}.
        x_shape: shape of the batch the result multiplies, (B, ...).

    Returns:
        a[t] with shape (B, 1, ..., 1) (len(x_shape) dims), on t's device, in a's dtype.
    """
    out = a.to(t.device)[t]
    return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))


class GaussianDiffusion(torch.nn.Module):
    """Forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) for a given beta schedule.

    Args:
        betas: (T,) betas in (0, 1), e.g. from :func:`ddpm_lightning.schedules.make_betas`.
        prediction_type: what the network outputs: "eps" (the noise, Ho et al. 2020), "x0" (the clean
            image) or "v" (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022).
        min_snr_gamma: if given (> 0), weight the loss with Min-SNR-gamma (Hang et al. 2023); None: weight 1.
        timestep_sampling: how :meth:`sample_timesteps` draws training t (see :data:`TimestepSampling`).
        lognormal_mean, lognormal_std: mean and std of ln sigma for ``lognormal`` (EDM's -1.2 and 1.2).
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    snr: Tensor

    def __init__(
        self,
        betas: Tensor,
        prediction_type: PredictionType = "eps",
        min_snr_gamma: float | None = None,
        timestep_sampling: TimestepSampling = "uniform",
        lognormal_mean: float = EDM_LOGNORMAL_MEAN,
        lognormal_std: float = EDM_LOGNORMAL_STD,
    ) -> None:
        super().__init__()
        if prediction_type not in get_args(PredictionType):
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; choose one of: {', '.join(get_args(PredictionType))}"
            )
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or None to disable), got {min_snr_gamma}")
        if timestep_sampling not in get_args(TimestepSampling):
            raise ValueError(
                f"unknown timestep_sampling {timestep_sampling!r}; choose one of: "
                + ", ".join(get_args(TimestepSampling))
            )
        if not lognormal_std > 0:
            raise ValueError(f"lognormal_std must be > 0, got {lognormal_std}")
        check_betas(betas)
        self.timestep_sampling: TimestepSampling = timestep_sampling
        self.lognormal_mean, self.lognormal_std = float(lognormal_mean), float(lognormal_std)
        self.prediction_type: PredictionType = prediction_type
        self.min_snr_gamma = min_snr_gamma

        b = betas.detach().to(device="cpu", dtype=torch.float64)
        alphas = 1.0 - b
        ac = torch.cumprod(alphas, dim=0)  # abar_t
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])  # abar_{t-1}; 1 (clean data) before t=0
        # Ho et al. 2020 eq. 7: beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
        posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": b,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "sqrt_recip_alphas_cumprod": ac.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # beta-tilde_0 = 0 (x_{-1} is x_0 itself): log would be -inf, so reuse beta-tilde_1 at t=0 as
            # improved-diffusion does; the sampler adds no noise at t=0, so the value there is never used.
            "posterior_log_variance_clipped": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            # Ho et al. 2020 eq. 7: mu-tilde_t = coef1 * x_0 + coef2 * x_t
            "posterior_mean_coef1": b * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            "snr": ac / (1.0 - ac),  # signal-to-noise ratio abar / (1 - abar) (Kingma et al. 2021)
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]

    def reverse_log_variance(self, variance: VarianceType) -> Tensor:
        """log sigma_t^2 of the DDPM reverse step p(x_{t-1} | x_t), (T,).

        "fixed_small": log beta-tilde_t, clipped at t=0 (``posterior_log_variance_clipped``); "fixed_large": log
        beta_t with beta_0 replaced by beta-tilde_1, as improved-diffusion does (a better log-likelihood at t=0).
        The entry for t=0 is never used: no noise is added on the last step.
        """
        if variance == "fixed_small":
            return self.posterior_log_variance_clipped
        if variance == "fixed_large":
            return torch.cat([self.posterior_variance[1:2], self.betas[1:]]).log()
        raise ValueError(f"unknown variance {variance!r}; choose one of: {', '.join(get_args(VarianceType))}")

    # -- forward process ------------------------------------------------------------------------------------
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020 eq. 4).

        x_start, noise: (B, ...); t: (B,) long. Returns x_t, (B, ...).
        """
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    # -- conversions between eps, x0 and v (all (B, ...) tensors; t (B,)) ------------------------------------
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (eq. 4 solved for x_0; Ho et al. 2020 eq. 15)."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar) (eq. 4 solved for eps)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    def get_v(self, x_start: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, Sec. 4 / App. D)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * eps
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start
        )

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = sqrt(abar) x_t - sqrt(1 - abar) v (Salimans & Ho 2022, App. D)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(1 - abar) x_t + sqrt(abar) v (Salimans & Ho 2022, App. D)."""
        return (
            extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
            + extract(self.sqrt_alphas_cumprod, t, x_t.shape) * v
        )

    def model_output_to_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Read a raw network output (B, ...) by ``prediction_type``; returns (x0, eps), each (B, ...)."""
        if self.prediction_type == "eps":
            return self.predict_x0_from_eps(x_t, t, model_output), model_output
        if self.prediction_type == "x0":
            return model_output, self.predict_eps_from_x0(x_t, t, model_output)
        return self.predict_x0_from_v(x_t, t, model_output), self.predict_eps_from_v(x_t, t, model_output)

    def training_target(self, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The network's target for x_t = q_sample(x_start, t, noise): noise, x_start or v; (B, ...)."""
        if self.prediction_type == "eps":
            return noise
        if self.prediction_type == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    # -- posterior -------------------------------------------------------------------------------------------
    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020 eqs. 6-7).

        Returns:
            mean (B, ...); variance and log_variance_clipped (B, 1, ..., 1). At t=0 the mean is x_0 and the
            variance 0 (its log is clipped to log beta-tilde_1, see ``posterior_log_variance_clipped``).
        """
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # -- loss ------------------------------------------------------------------------------------------------
    def sample_timesteps(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> Tensor:
        """Training timesteps (B,) long in {0, ..., T-1}, drawn as ``timestep_sampling`` says.

        ``lognormal``: ln sigma ~ N(lognormal_mean, lognormal_std^2) (Karras et al. 2022, Table 1), rounded to the
        nearest discrete level in log sigma (levels beyond the schedule's ends go to t = 0 or T - 1).
        """
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        z = torch.randn(batch_size, device=device, generator=generator, dtype=torch.float64)
        sigma = (self.lognormal_mean + self.lognormal_std * z).exp()
        return self.t_from_ve_sigma(sigma).round().long().to(device)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample loss weight (B,) for timesteps t (B,).

        1 without min_snr_gamma. With it, Min-SNR-gamma (Hang et al. 2023, eq. 10 and Sec. 3.4): the x0-loss
        weight min(snr, gamma), converted to each target's MSE: eps: min(snr, gamma) / snr (since
        ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / snr); x0: min(snr, gamma); v: min(snr, gamma) / (snr + 1).
        """
        if self.min_snr_gamma is None:
            return torch.ones(t.shape[0], device=t.device, dtype=self.snr.dtype)
        snr = extract(self.snr, t, t.shape)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "eps":
            return clipped / snr
        if self.prediction_type == "x0":
            return clipped
        return clipped / (snr + 1.0)

    def training_loss(
        self,
        denoise_fn: Callable[[Tensor, Tensor], Tensor],
        x_start: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Weighted MSE of denoise_fn(x_t, t) against the target, per sample (Ho et al. 2020 eq. 14).

        Args:
            denoise_fn: (x_t (B, ...), t (B,)) -> output in ``prediction_type``; wrap labels in a closure.
            x_start: clean data (B, ...), in [-1, 1].
            t: (B,) long timesteps in {0, ..., T-1}.
            noise: eps ~ N(0, I) (B, ...); drawn with ``generator`` on x_start's device and dtype when None.

        Returns:
            (B,) loss: loss_weight(t) * mean over non-batch dims of (output - target)^2.
        """
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        model_output = denoise_fn(x_t, t)
        target = self.training_target(x_start, noise, t)
        mse = (model_output.float() - target.float()).pow(2).mean(dim=tuple(range(1, x_start.ndim)))
        return mse * self.loss_weight(t)

    # -- continuous-time views for the solvers (ddpm_lightning.solvers) --
    # The ODE/SDE solvers work with the noise level sigma = sqrt((1 - abar) / abar) of the variance-exploding view
    # x_t / sqrt(abar_t) = x_0 + sigma eps (Karras et al. 2022, Sec. 2 and Table 1), and step between levels that need
    # not be one of the T discrete ones; the VP coefficients of such a level are alpha = sqrt(abar) = 1 / sqrt(1 +
    # sigma^2) and sigma_vp = sqrt(1 - abar) = sigma alpha (Lu et al. 2022, arXiv 2206.00927, Sec. 2).
    def ve_sigmas(self) -> Tensor:
        """The discrete noise levels sigma_t = sqrt((1 - abar_t) / abar_t), (T,) float64 on the buffers' device.

        Recomputed in float64 from the betas (the float32 tables lose digits where abar_t is small).
        """
        alphas_cumprod = torch.cumprod(1.0 - self.betas.double(), dim=0)
        return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()

    def t_from_ve_sigma(self, sigma: Tensor) -> Tensor:
        """Fractional timestep(s) of noise level(s) ``sigma`` (any shape), float64, in [0, T-1].

        log sigma is interpolated linearly between neighbouring discrete levels (k-diffusion's and diffusers'
        ``_sigma_to_t``); levels outside [sigma_0, sigma_{T-1}] are clamped to the end points.
        """
        log_sigmas = self.ve_sigmas().log()  # (T,), strictly increasing
        log_sigma = sigma.to(log_sigmas).clamp(min=1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_timesteps - 2)
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
        return low + w.clamp(0.0, 1.0)

    def ve_sigma_at(self, t: Tensor) -> Tensor:
        """Noise level at fractional timestep(s) ``t`` in [0, T-1] (any shape), float64: the inverse of
        :meth:`t_from_ve_sigma` (log-linear between the discrete levels); integer t gives the discrete sigma_t."""
        log_sigmas = self.ve_sigmas().log()
        t = t.to(log_sigmas).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    @staticmethod
    def alpha_sigma_from_ve_sigma(sigma: float | Tensor) -> tuple[float | Tensor, float | Tensor]:
        """VP coefficients (alpha, sigma_vp) = (1 / sqrt(1 + sigma^2), sigma / sqrt(1 + sigma^2)) of level sigma, so
        that x_t = alpha x_0 + sigma_vp eps; sigma = 0 gives (1, 0), clean data."""
        alpha = (1.0 + sigma**2) ** -0.5
        return alpha, sigma * alpha

    def model_output_to_x0_eps_at(
        self, model_output: Tensor, x_t: Tensor, alpha: float | Tensor, sigma: float | Tensor
    ) -> tuple[Tensor, Tensor]:
        """:meth:`model_output_to_x0_eps` at a level given by its VP coefficients instead of a table index.

        Args:
            model_output: raw network output (B, ...) in ``prediction_type``.
            x_t: the network input (B, ...), x_t = alpha x_0 + sigma eps.
            alpha, sigma: sqrt(abar) and sqrt(1 - abar) of that level (alpha^2 + sigma^2 = 1), floats or tensors
                broadcastable against x_t (e.g. (B, 1, 1, 1)); sigma > 0.

        Returns:
            (x0, eps), each (B, ...): eq. 4 of Ho et al. 2020 solved for the other one; for v, Salimans & Ho 2022
            App. D: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v.
        """
        if self.prediction_type == "eps":
            return (x_t - sigma * model_output) / alpha, model_output
        if self.prediction_type == "x0":
            return model_output, (x_t - alpha * model_output) / sigma
        return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output

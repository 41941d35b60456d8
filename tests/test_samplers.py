"""Samplers: oracle recovery, Gaussian-data statistics, DDIM(eta=1) = DDPM, determinism, trajectories, CFG."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.samplers import (
    DenoiseFn,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    guided_denoise_fn,
)
from ddpm_lightning.sampling import sample
from ddpm_lightning.schedules import make_betas

T = 50
SHAPE = (3, 2, 4, 4)
PREDICTION_TYPES = ["eps", "x0", "v"]


def _diffusion(prediction_type: str = "eps", schedule: str = "linear", num_timesteps: int = T) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas(schedule, num_timesteps), prediction_type=prediction_type)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x_star() -> torch.Tensor:
    return torch.rand(SHAPE, generator=_gen(123)) * 1.8 - 0.9  # inside [-1, 1]


def _output_from_x0(d: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The exact model output, in d.prediction_type, for E[x_0 | x_t] = x0; closed forms in float64."""
    a = d.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    x_t, x0 = x_t.double(), x0.double()
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[d.prediction_type]
    return out.float()


def _point_oracle(d: GaussianDiffusion, x_star: torch.Tensor) -> DenoiseFn:
    """Optimal denoiser when the data is the single point x_star."""
    return lambda x_t, t: _output_from_x0(d, x_t, t, x_star)


def _gaussian_oracle(d: GaussianDiffusion, mu: float, s: float) -> DenoiseFn:
    """Optimal denoiser for data ~ N(mu, s^2 I), a = abar_t:
    E[x_0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu)."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = d.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
        x0 = mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x_t.double() - a.sqrt() * mu)
        return _output_from_x0(d, x_t, t, x0)

    return denoise


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_oracle_recovers_the_data_point(prediction_type: str, variance: str) -> None:
    d = _diffusion(prediction_type)
    x_star = _x_star()
    out = ddpm_sample(_point_oracle(d, x_star), d, SHAPE, generator=_gen(), variance=variance)
    assert out.shape == SHAPE and out.dtype == torch.float32
    torch.testing.assert_close(out, x_star, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("num_steps", [1, 10, T])
def test_ddim_oracle_recovers_the_data_point(prediction_type: str, eta: float, num_steps: int) -> None:
    d = _diffusion(prediction_type)
    x_star = _x_star()
    out = ddim_sample(_point_oracle(d, x_star), d, SHAPE, num_steps=num_steps, eta=eta, generator=_gen())
    # one step predicts x0 at t=T-1, where 1/sqrt(abar) ~ 360 amplifies float32 rounding to ~1e-4 for eps/v
    torch.testing.assert_close(out, x_star, atol=1e-5 if num_steps > 1 else 3e-4, rtol=0)


def test_ddim_eta0_keeps_the_noise_fixed() -> None:
    """With the point oracle, deterministic DDIM (eq. 12, sigma=0) moves along
    x_tau = sqrt(a) x* + sqrt(1-a) eps with the eps of x_T: trajectory entries = q_sample(x*, tau, eps_T)."""
    d = _diffusion("eps", schedule="cosine")
    x_star = _x_star()
    x_T = torch.randn(SHAPE, generator=_gen(1))
    taus = ddim_timesteps(T, 8)
    _, traj = ddim_sample(_point_oracle(d, x_star), d, SHAPE, num_steps=8, x_T=x_T, return_trajectory=True)
    t_T = torch.full((SHAPE[0],), T - 1)
    eps_T = d.predict_eps_from_x0(x_T, t_T, x_star)
    for i, tau in enumerate(taus[1:].tolist(), start=1):
        expected = d.q_sample(x_star, torch.full((SHAPE[0],), tau), eps_T)
        # x0 is predicted from x_T with 1/sqrt(abar_T-1) ~ 1000 (cosine): float32 rounding gives ~1e-4 there
        torch.testing.assert_close(traj[i], expected, atol=2e-4, rtol=0)


MU, S = 0.3, 0.5


def _gaussian_reverse_moments(betas: torch.Tensor, sampler: str) -> tuple[float, float]:
    """Exact mean and std of the samples for N(MU, S^2) data and the exact denoiser, in float64.

    Every step is affine in x_t, x_{t-1} = gain * x_t + const + sigma * z, so from x_T ~ N(0, 1) the moments
    follow M <- gain M + const, V <- gain^2 V + sigma^2. DDPM: x_{t-1} = coef1 x0 + coef2 x_t + sigma z
    (Ho et al. 2020 eq. 7); DDIM (eta=0, all steps): x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    """
    a = torch.cumprod(1 - betas, dim=0)
    a_prev = torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    mean, var = 0.0, 1.0
    for t in range(len(betas) - 1, -1, -1):
        k = a[t].sqrt() * S**2 / (a[t] * S**2 + 1 - a[t])  # x0 = MU + k (x_t - sqrt(a) MU)
        x0_gain, x0_const = k, MU - k * a[t].sqrt() * MU
        if sampler == "ddim":  # eps = (x_t - sqrt(a) x0) / sqrt(1 - a)
            r = ((1 - a_prev[t]) / (1 - a[t])).sqrt()
            gain = a_prev[t].sqrt() * x0_gain + r * (1 - a[t].sqrt() * x0_gain)
            const = (a_prev[t].sqrt() - r * a[t].sqrt()) * x0_const
            sigma2 = 0.0
        else:
            coef1 = betas[t] * a_prev[t].sqrt() / (1 - a[t])
            coef2 = (1 - a_prev[t]) * (1 - betas[t]).sqrt() / (1 - a[t])
            gain, const = coef1 * x0_gain + coef2, coef1 * x0_const
            posterior_var = betas[t] * (1 - a_prev[t]) / (1 - a[t])
            sigma2 = 0.0 if t == 0 else {"fixed_small": posterior_var, "fixed_large": betas[t]}[sampler]
        mean, var = gain * mean + const, gain**2 * var + sigma2
    return float(mean), float(var) ** 0.5


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_samplers_draw_the_predicted_gaussian(prediction_type: str) -> None:
    """With the exact denoiser of N(MU, S^2) data, the samples' mean and std match the exact moments of each
    sampler (T=100 linear: std 0.468 fixed_small, 0.508 fixed_large, 0.486 DDIM; beta-tilde and beta are the
    two extreme reverse variances of Ho et al. 2020 Sec. 3.2, and their stds bracket S).

    Pixels are i.i.d., so (20, 1, 32, 32) gives 20480 samples (a small batch keeps CPU threads idle); standard
    errors ~0.0035 (mean) and ~0.0025 (std).
    """
    betas = make_betas("linear", 100)
    d = GaussianDiffusion(betas, prediction_type=prediction_type)
    denoise = _gaussian_oracle(d, MU, S)
    shape = (20, 1, 32, 32)
    samples = {
        "fixed_small": ddpm_sample(denoise, d, shape, generator=_gen(), clip_x0=False),
        "fixed_large": ddpm_sample(denoise, d, shape, generator=_gen(), clip_x0=False, variance="fixed_large"),
        "ddim": ddim_sample(denoise, d, shape, num_steps=100, generator=_gen(), clip_x0=False),
    }
    for sampler, x in samples.items():
        mean, std = _gaussian_reverse_moments(betas, sampler)
        assert x.mean().item() == pytest.approx(mean, abs=0.012), sampler
        assert x.std().item() == pytest.approx(std, abs=0.008), sampler
    assert samples["fixed_small"].std().item() < S < samples["fixed_large"].std().item()


@pytest.mark.parametrize("clip_x0", [True, False])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_eta1_all_steps_is_ddpm_fixed_small(clip_x0: bool, prediction_type: str) -> None:
    """eta=1, num_steps=T: sigma_t^2 (eq. 16) = beta-tilde_t and the eq. 12 mean = the posterior mean (Song et
    al. 2021, eq. 7); both draw one N(0, I) per step except the last, so one generator gives the same path.
    The Gaussian oracle with std 0.8 around 0.5 predicts x0 outside [-1, 1] early on, so clipping matters."""
    d = _diffusion(prediction_type)
    denoise = _gaussian_oracle(d, 0.5, 0.8)
    x_T = torch.randn(SHAPE, generator=_gen(5))
    kw = {"x_T": x_T, "clip_x0": clip_x0, "return_trajectory": True}
    _, traj_ddpm = ddpm_sample(denoise, d, SHAPE, generator=_gen(9), **kw)
    _, traj_ddim = ddim_sample(denoise, d, SHAPE, num_steps=T, eta=1.0, generator=_gen(9), **kw)
    torch.testing.assert_close(traj_ddim, traj_ddpm, atol=2e-5, rtol=1e-5)
    # and eta=0 does differ, so the comparison above has teeth
    out_eta0 = ddim_sample(denoise, d, SHAPE, num_steps=T, eta=0.0, x_T=x_T, clip_x0=clip_x0)
    assert (out_eta0 - traj_ddpm[-1]).abs().max() > 0.1


def test_ddim_eta0_is_deterministic_given_x_T_and_leaves_the_generator_alone() -> None:
    d = _diffusion("v")
    denoise = _gaussian_oracle(d, 0.0, 0.6)
    x_T = torch.randn(SHAPE, generator=_gen(2))
    g1, g2 = _gen(1), _gen(2)
    a = ddim_sample(denoise, d, SHAPE, num_steps=10, x_T=x_T, generator=g1)
    b = ddim_sample(denoise, d, SHAPE, num_steps=10, x_T=x_T, generator=g2)
    assert torch.equal(a, b)
    assert torch.equal(g1.get_state(), _gen(1).get_state())


@pytest.mark.parametrize(
    ("sampler", "kwargs"),
    [
        ("ddpm", {}),
        ("ddpm", {"variance": "fixed_large"}),
        ("ddim", {"num_steps": 10, "eta": 0.0}),
        ("ddim", {"eta": 0.5}),
    ],
)
def test_same_seed_same_samples_different_seed_different(sampler: str, kwargs: dict) -> None:
    d = _diffusion()
    denoise = _gaussian_oracle(d, 0.0, 0.6)
    a = sample(denoise, d, SHAPE, sampler=sampler, generator=_gen(0), **kwargs)
    b = sample(denoise, d, SHAPE, sampler=sampler, generator=_gen(0), **kwargs)
    c = sample(denoise, d, SHAPE, sampler=sampler, generator=_gen(1), **kwargs)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_x_T_is_drawn_with_the_generator() -> None:
    d = _diffusion()
    _, traj = ddim_sample(_gaussian_oracle(d, 0, 1), d, SHAPE, num_steps=3, generator=_gen(4), return_trajectory=True)
    assert torch.equal(traj[0], torch.randn(SHAPE, generator=_gen(4)))


@pytest.mark.parametrize(("sampler", "kwargs", "steps"), [("ddpm", {}, T), ("ddim", {"num_steps": 7}, 7)])
def test_trajectory(sampler: str, kwargs: dict, steps: int) -> None:
    d = _diffusion()
    x_T = torch.randn(SHAPE, generator=_gen(3))
    denoise = _gaussian_oracle(d, 0.1, 0.5)
    out, traj = sample(denoise, d, SHAPE, sampler=sampler, x_T=x_T, generator=_gen(), return_trajectory=True, **kwargs)
    assert traj.shape == (steps + 1, *SHAPE)
    assert torch.equal(traj[0], x_T)
    assert torch.equal(traj[-1], out)
    assert torch.equal(out, sample(denoise, d, SHAPE, sampler=sampler, x_T=x_T, generator=_gen(), **kwargs))
    # progress bar changes nothing but the display
    shown = sample(denoise, d, SHAPE, sampler=sampler, x_T=x_T, generator=_gen(), progress=True, **kwargs)
    assert torch.equal(out, shown)


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(100, 5).tolist() == [99, 74, 50, 25, 0]
    assert ddim_timesteps(50, 10).tolist() == [49, 44, 38, 33, 27, 22, 16, 11, 5, 0]
    assert ddim_timesteps(50, 1).tolist() == [49]
    assert ddim_timesteps(50, 50).tolist() == list(range(49, -1, -1))
    for n in (2, 3, 17, 333, 999, 1000):
        steps = ddim_timesteps(1000, n)
        assert len(steps) == n and steps[0] == 999 and steps[-1] == 0 and (steps.diff() < 0).all()


def test_invalid_choices() -> None:
    d = _diffusion()
    denoise = _gaussian_oracle(d, 0, 1)
    with pytest.raises(
        ValueError,
        match="unknown sampler 'bogus'; choose one of: ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc, heun, euler",
    ):
        sample(denoise, d, SHAPE, sampler="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown variance 'learned'; choose one of: fixed_small, fixed_large"):
        ddpm_sample(denoise, d, SHAPE, variance="learned")  # type: ignore[arg-type]
    for bad in (0, T + 1, 2.5):
        with pytest.raises(ValueError, match=rf"num_steps must be an integer in \[1, {T}\]"):
            ddim_sample(denoise, d, SHAPE, num_steps=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_sample(denoise, d, SHAPE, eta=-0.1)
    with pytest.raises(ValueError, match="x_T has shape"):
        ddpm_sample(denoise, d, SHAPE, x_T=torch.zeros(1, 2, 4, 4))


class _ToyModel:
    """model(x, t, y) = x * (y + 1) + t (unconditional: y None -> x * 0.5 + t); records each call's batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((x.shape[0], None if y is None else y.clone()))
        scale = torch.full((x.shape[0],), 0.5) if y is None else (y + 1).float()
        return x * scale.reshape(-1, 1, 1, 1) + t.float().reshape(-1, 1, 1, 1)


@pytest.fixture
def guidance_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(SHAPE, generator=_gen(6))
    t = torch.tensor([3, 10, 40])
    y = torch.tensor([0, 2, 1])
    return x, t, y


NULL = 5


def test_guidance_w1_is_conditional_in_one_call(guidance_inputs) -> None:
    x, t, y = guidance_inputs
    model = _ToyModel()
    out = guided_denoise_fn(model, y, 1.0, NULL)(x, t)
    assert len(model.calls) == 1 and model.calls[0][0] == SHAPE[0] and torch.equal(model.calls[0][1], y)
    assert torch.equal(out, _ToyModel()(x, t, y))


def test_guidance_w0_is_unconditional_null_label(guidance_inputs) -> None:
    x, t, y = guidance_inputs
    model = _ToyModel()
    out = guided_denoise_fn(model, y, 0.0, NULL)(x, t)
    assert len(model.calls) == 1 and torch.equal(model.calls[0][1], torch.full((3,), NULL))
    assert torch.equal(out, _ToyModel()(x, t, torch.full((3,), NULL)))


def test_guidance_w3_extrapolates_in_one_batched_call(guidance_inputs) -> None:
    x, t, y = guidance_inputs
    model = _ToyModel()
    out = guided_denoise_fn(model, y, 3.0, NULL)(x, t)
    assert len(model.calls) == 1 and model.calls[0][0] == 2 * SHAPE[0]
    cond = x * (y + 1).float().reshape(-1, 1, 1, 1) + t.float().reshape(-1, 1, 1, 1)
    uncond = x * (NULL + 1) + t.float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond))


def test_guidance_without_labels_is_the_unconditional_model(guidance_inputs) -> None:
    x, t, _ = guidance_inputs
    model = _ToyModel()
    out = guided_denoise_fn(model, None, 3.0, NULL)(x, t)
    assert model.calls == [(SHAPE[0], None)]
    torch.testing.assert_close(out, x * 0.5 + t.float().reshape(-1, 1, 1, 1))


def test_per_sample_generators_make_samples_independent_of_the_batch():
    """With one generator per sample, sample i is the same alone or inside any batch (DDP / batch-size invariance)."""
    from ddpm_lightning.samplers import ddim_sample, ddpm_sample

    diffusion = GaussianDiffusion(make_betas("linear", 20))
    denoise = lambda x, t: 0.1 * x  # noqa: E731  (any deterministic per-sample function of x_t)

    def gens(idx):
        return [torch.Generator().manual_seed(1000 + i) for i in idx]

    for sampler, kw in ((ddpm_sample, {}), (ddim_sample, {"num_steps": 5, "eta": 1.0})):
        full = sampler(denoise, diffusion, (4, 1, 3, 3), generator=gens(range(4)), **kw)
        part = sampler(denoise, diffusion, (2, 1, 3, 3), generator=gens([2, 3]), **kw)
        torch.testing.assert_close(full[2:], part, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 generators for a batch of 4"):
        ddpm_sample(denoise, diffusion, (4, 1, 3, 3), generator=gens(range(3)))

"""GaussianDiffusion: forward process statistics, eps/x0/v conversions, posterior, and the (Min-SNR) loss."""

from __future__ import annotations

import itertools

import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion, extract
from ddpm_lightning.schedules import make_betas

T = 100
PREDICTION_TYPES = ["eps", "x0", "v"]


def _diffusion(prediction_type: str = "eps", schedule: str = "linear", **kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas(schedule, T), prediction_type=prediction_type, **kwargs)


def _ac64(schedule: str = "linear") -> torch.Tensor:
    """alphas_cumprod recomputed independently in float64."""
    return torch.cumprod(1.0 - make_betas(schedule, T), dim=0)


def test_extract_shape_and_values() -> None:
    a = torch.arange(10, dtype=torch.float32) * 2
    t = torch.tensor([0, 3, 9])
    out = extract(a, t, (3, 2, 4, 5))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [0.0, 6.0, 18.0]
    assert extract(a, t, (3,)).shape == (3,)
    assert (torch.ones(3, 2, 4, 5) * out).shape == (3, 2, 4, 5)


def test_buffers_float32_non_persistent_and_closed_forms() -> None:
    d = _diffusion()
    assert d.num_timesteps == T
    assert d.state_dict() == {}  # all derived from hyperparameters
    names = dict(d.named_buffers())
    assert len(names) == 12 and all(b.dtype == torch.float32 and b.shape == (T,) for b in names.values())
    ac = _ac64()
    torch.testing.assert_close(d.alphas_cumprod.double(), ac, rtol=1e-6, atol=0)
    assert d.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])
    torch.testing.assert_close(d.snr.double(), ac / (1 - ac), rtol=1e-5, atol=0)
    torch.testing.assert_close((d.sqrt_alphas_cumprod**2 + d.sqrt_one_minus_alphas_cumprod**2), torch.ones(T))


@pytest.mark.parametrize("t", [0, 10, 60, T - 1])
def test_q_sample_empirical_moments(t: int) -> None:
    d = _diffusion()
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x_start = torch.full((n, 1, 1, 1), 0.7)
    noise = torch.randn(x_start.shape, generator=g)
    x_t = d.q_sample(x_start, torch.full((n,), t), noise)
    ac = _ac64()[t].item()
    # standard errors: sqrt((1 - ac) / n) <= 0.007 for the mean, ~1% of the variance
    assert x_t.mean().item() == pytest.approx(ac**0.5 * 0.7, abs=0.03)
    assert x_t.var().item() == pytest.approx(1 - ac, rel=0.04, abs=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_conversions_recover_truth_from_q_sample(schedule: str) -> None:
    """From x_t = q_sample(x_start, t, eps), each of x0 / eps / v is recovered from x_t and another one."""
    d = _diffusion(schedule=schedule)
    g = torch.Generator().manual_seed(1)
    x_start = torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x_start.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 5, 20, 50, 80, 98, 99])
    x_t = d.q_sample(x_start, t, eps)
    v = d.get_v(x_start, eps, t)
    # the float32 coefficients carry ~1e-7 relative error, amplified by 1/sqrt(abar) (x0 from eps, up to ~2000
    # for cosine at T-1) or 1/sqrt(1 - abar) (eps from x0, ~30 at t=0): the tolerance scales with both
    ac = _ac64(schedule)[t]
    atol = (5e-7 * (ac.rsqrt() + (1 - ac).rsqrt())).reshape(-1, 1, 1, 1)

    def check(got: torch.Tensor, expected: torch.Tensor) -> None:
        assert ((got - expected).abs() <= atol).all(), (got - expected).abs().amax(dim=(1, 2, 3))

    check(d.predict_x0_from_eps(x_t, t, eps), x_start)
    check(d.predict_x0_from_v(x_t, t, v), x_start)
    check(d.predict_eps_from_x0(x_t, t, x_start), eps)
    check(d.predict_eps_from_v(x_t, t, v), eps)
    check(d.get_v(d.predict_x0_from_eps(x_t, t, eps), eps, t), v)
    check(d.get_v(x_start, d.predict_eps_from_x0(x_t, t, x_start), t), v)
    # v by its definition (Salimans & Ho 2022): sqrt(abar) eps - sqrt(1 - abar) x0
    expected_v = ac.sqrt().reshape(-1, 1, 1, 1) * eps - (1 - ac).sqrt().reshape(-1, 1, 1, 1) * x_start
    check(v, expected_v)


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(["eps", "x0", "v"], 2)))
def test_round_trip_pairs_are_exact_inverses(a: str, b: str) -> None:
    """Converting a -> b -> a at the same x_t returns a (to 1e-5), for every ordered pair."""
    d = _diffusion()
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(6, 2, 3, 3, generator=g)
    t = torch.tensor([0, 7, 33, 50, 90, 99])
    value = torch.randn(x_t.shape, generator=g)

    def to_x0(kind: str, z: torch.Tensor) -> torch.Tensor:
        return {"x0": z, "eps": d.predict_x0_from_eps(x_t, t, z), "v": d.predict_x0_from_v(x_t, t, z)}[kind]

    def from_x0(kind: str, x0: torch.Tensor) -> torch.Tensor:
        eps = d.predict_eps_from_x0(x_t, t, x0)
        return {"x0": x0, "eps": eps, "v": d.get_v(x0, eps, t)}[kind]

    back = from_x0(a, to_x0(b, from_x0(b, to_x0(a, value))))
    # eps <-> x0 at t=0 divides by sqrt(1/abar_0 - 1) ~ 0.03, amplifying float32 rounding ~30x
    torch.testing.assert_close(back, value, atol=1e-5 if "eps" not in (a, b) else 5e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 2, 30, T - 1])
def test_q_posterior_matches_gaussian_product(t: int) -> None:
    """By Bayes, q(x_{t-1} | x_t, x_0) ∝ N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
    * N(x_t; sqrt(alpha_t) x_{t-1}, beta_t), a product of Gaussians in x_{t-1}."""
    d = _diffusion()
    betas = make_betas("linear", T)
    ac = _ac64()
    g = torch.Generator().manual_seed(3)
    x_start = torch.rand(4, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(x_start.shape, generator=g, dtype=torch.float64)
    # product of Gaussians in x_{t-1}: precisions add, means weighted by precision
    prior_mean, prior_var = ac[t - 1].sqrt() * x_start, 1 - ac[t - 1]
    lik_mean, lik_var = x_t / (1 - betas[t]).sqrt(), betas[t] / (1 - betas[t])
    var = 1 / (1 / prior_var + 1 / lik_var)
    mean = var * (prior_mean / prior_var + lik_mean / lik_var)
    got_mean, got_var, got_log_var = d.q_posterior(x_start, x_t, torch.full((4,), t))
    torch.testing.assert_close(got_mean, mean, rtol=1e-5, atol=1e-6)
    assert got_var.shape == (4, 1, 1, 1)
    torch.testing.assert_close(got_var.flatten().double(), var.expand(4), rtol=1e-5, atol=0)
    torch.testing.assert_close(got_log_var.flatten().double(), var.log().expand(4), rtol=1e-5, atol=0)


def test_q_posterior_at_t0_is_x0_with_clipped_log_variance() -> None:
    d = _diffusion()
    x_start = torch.rand(2, 1, 3, 3) * 2 - 1
    x_t = torch.randn(x_start.shape)
    mean, var, log_var = d.q_posterior(x_start, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x_start)  # abar_{-1} = 1: the "previous" step is clean data
    assert d.posterior_variance[0].item() == 0.0 and (var == 0).all()
    assert torch.isfinite(d.posterior_log_variance_clipped).all()
    assert log_var.flatten()[0].item() == pytest.approx(d.posterior_variance[1].log().item())


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_model_output_to_x0_eps(prediction_type: str) -> None:
    d = _diffusion(prediction_type)
    g = torch.Generator().manual_seed(4)
    x_start = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x_start.shape, generator=g)
    t = torch.tensor([0, 10, 40, 70, 99])
    x_t = d.q_sample(x_start, t, eps)
    output = {"eps": eps, "x0": x_start, "v": d.get_v(x_start, eps, t)}[prediction_type]
    x0, eps_hat = d.model_output_to_x0_eps(output, x_t, t)
    torch.testing.assert_close(x0, x_start, atol=2e-4, rtol=0)
    # eps from x0 is ill-conditioned at t=0 (divides by sqrt(1 - abar_0) = 0.03); compare t >= 10 tightly
    torch.testing.assert_close(eps_hat[1:], eps[1:], atol=1e-4, rtol=0)
    torch.testing.assert_close(d.training_target(x_start, eps, t), output)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("min_snr_gamma", [None, 5.0])
def test_oracle_loss_is_zero_and_wrong_output_is_not(prediction_type: str, min_snr_gamma: float | None) -> None:
    d = _diffusion(prediction_type, min_snr_gamma=min_snr_gamma)
    g = torch.Generator().manual_seed(5)
    x_start = torch.rand(4, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x_start.shape, generator=g)
    t = torch.tensor([0, 5, 50, 99])
    target = {"eps": noise, "x0": x_start, "v": d.get_v(x_start, noise, t)}[prediction_type]
    seen: list[torch.Tensor] = []

    def oracle(x_t: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        seen.append(x_t)
        assert torch.equal(t_in, t)
        return target

    loss = d.training_loss(oracle, x_start, t, noise=noise)
    assert loss.shape == (4,) and (loss == 0).all()
    torch.testing.assert_close(seen[0], d.q_sample(x_start, t, noise))
    off_by_one = d.training_loss(lambda x_t, t_in: target + 1.0, x_start, t, noise=noise)
    torch.testing.assert_close(off_by_one, d.loss_weight(t))  # MSE of a constant offset 1 is 1, times weight


def test_training_loss_draws_noise_from_generator() -> None:
    d = _diffusion()
    x_start = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([10, 20, 30])

    def zero_model(x_t: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)

    a = d.training_loss(zero_model, x_start, t, generator=torch.Generator().manual_seed(7))
    b = d.training_loss(zero_model, x_start, t, generator=torch.Generator().manual_seed(7))
    c = d.training_loss(zero_model, x_start, t, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    expected = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(7)).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(a, expected)  # eps target, zero prediction: loss = mean(noise^2)


def test_min_snr_weights_hand_computed() -> None:
    gamma = 5.0
    t = torch.tensor([0, 20, 60, 99])
    ac = _ac64()[t]
    snr = ac / (1 - ac)
    assert snr[0] > gamma > snr[-1]  # the clip is active on some, not all
    clipped = snr.clamp(max=gamma)
    expected = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}
    for prediction_type, weight in expected.items():
        got = _diffusion(prediction_type, min_snr_gamma=gamma).loss_weight(t)
        torch.testing.assert_close(got.double(), weight, rtol=1e-5, atol=0)
    # eps weight at the noisiest step is 1 (snr < gamma), at t=0 it is gamma / snr
    eps_w = _diffusion("eps", min_snr_gamma=gamma).loss_weight(t)
    assert eps_w[-1].item() == 1.0 and eps_w[0].item() == pytest.approx(gamma / snr[0].item(), rel=1e-5)
    assert torch.equal(_diffusion("v").loss_weight(t), torch.ones(4))


def test_invalid_arguments() -> None:
    betas = make_betas("linear", T)
    with pytest.raises(ValueError, match="unknown prediction_type 'score'; choose one of: eps, x0, v"):
        GaussianDiffusion(betas, prediction_type="score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        GaussianDiffusion(betas, min_snr_gamma=0.0)
    with pytest.raises(ValueError, match=r"betas must be finite and in \(0, 1\)"):
        GaussianDiffusion(torch.tensor([0.1, 1.0]))


def test_uniform_timesteps_cover_every_step_evenly() -> None:
    d = _diffusion()
    t = d.sample_timesteps(200_000, "cpu", generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=T).float()
    assert t.dtype == torch.long and counts.shape == (T,)
    # 2,000 expected per bin; the binomial sd is ~44, so 5 sd is 220
    assert (counts - 2000).abs().max() < 220


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lognormal_timesteps_follow_edm_noise_levels(schedule: str) -> None:
    """ln sigma of the drawn t is N(P_mean, P_std^2) (Karras et al. 2022, Table 1) up to the rounding to discrete
    levels, inside the schedule's range of sigma; the mass beyond it lands on the end points."""
    d = GaussianDiffusion(make_betas(schedule, 1000), timestep_sampling="lognormal")
    t = d.sample_timesteps(200_000, "cpu", generator=torch.Generator().manual_seed(0))
    log_sigma = d.ve_sigmas()[t].log()
    lo, hi = d.ve_sigmas()[[0, -1]].log().tolist()
    normal = torch.distributions.Normal(-1.2, 1.2)
    inside = (log_sigma > lo) & (log_sigma < hi)
    # the share of draws inside the schedule's range is the normal's mass there (sd of the estimate ~0.001)
    mass = float(normal.cdf(torch.tensor(hi)) - normal.cdf(torch.tensor(lo)))
    assert abs(inside.float().mean().item() - mass) < 0.005
    # median and quartiles of ln sigma: -1.2 and -1.2 -/+ 0.6745 * 1.2 (rounding moves a level by < its spacing)
    q = torch.quantile(log_sigma[:50_000], torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert torch.allclose(q, torch.tensor([-2.0094, -1.2, -0.3906], dtype=torch.float64), atol=0.05)


def test_timestep_sampling_choices_are_validated() -> None:
    with pytest.raises(ValueError, match="choose one of: uniform, lognormal"):
        _diffusion(timestep_sampling="edm")
    with pytest.raises(ValueError, match="lognormal_std must be > 0"):
        _diffusion(timestep_sampling="lognormal", lognormal_std=0.0)

"""The variational bound in bits/dim against closed forms: the exact denoiser of a point, Ho et al. 2020 eq. 12,
the discretized decoder; and on real digits, that it falls as a network trains."""

from __future__ import annotations

import math

import pytest
import torch
from solver_cases import PREDICTION_TYPES, seeded

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.likelihood import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    normal_kl,
    variational_bound,
)
from ddpm_lightning.schedules import make_betas

SHAPE = (1, 6, 6)
D = math.prod(SHAPE)


def _on_grid(generator: torch.Generator) -> torch.Tensor:
    """An 8-bit image in [-1, 1], corners at the two open end bins."""
    x = torch.randint(0, 256, SHAPE, generator=generator).double().div(127.5).sub(1.0)
    x[0, 0, 0], x[0, -1, -1] = -1.0, 1.0
    return x.float()


def _output(d: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor):
    """The network output in d.prediction_type whose (x0, eps) are the given ones at (x_t, t)."""
    if d.prediction_type == "eps":
        return eps
    if d.prediction_type == "x0":
        return x0
    return d.get_v(x0, eps, t)


def _point_bound_by_hand(betas: torch.Tensor, x: torch.Tensor, variance: str) -> float:
    """The bound of a single data point x under its exact denoiser (x0_hat = x at every t), in nats, from the betas
    alone: the KL terms are only the variance mismatch, the prior and the decoder are Gaussian integrals."""
    b = betas.double()
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    tilde = b * (1 - ac_prev) / (1 - ac)  # beta-tilde_t, eq. 7
    x = x.double().flatten()
    prior = 0.5 * (-1 - (1 - ac[-1]).log() + (1 - ac[-1]) + ac[-1] * x**2).sum()
    kl = 0.0
    if variance == "fixed_large":  # KL(N(m, tilde) || N(m, beta)) per dimension, t >= 1
        kl = D * (0.5 * ((b[1:] / tilde[1:]).log() + tilde[1:] / b[1:] - 1)).sum()
    s = tilde[1].sqrt()  # the decoder's std at t = 0 (beta-tilde_1 for both variances)
    phi = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0).cdf
    w = 1 / 255 / s
    inner, edge = -(phi(w) - phi(-w)).log(), -phi(w).log()
    decoder = sum(float(edge if abs(v) == 1.0 else inner) for v in x)
    return float(prior + kl + decoder)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize(("schedule", "T"), [("linear", 1000), ("cosine", 100)])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_bound_of_a_point_under_its_exact_denoiser_is_the_closed_form(prediction_type, schedule, T, variance):
    betas = make_betas(schedule, T)
    d = GaussianDiffusion(betas, prediction_type=prediction_type)
    x = _on_grid(seeded(3))

    def exact(x_t, t):  # the optimal denoiser of data = the point x
        x0 = x.expand_as(x_t)
        return _output(d, x_t, t, x0, d.predict_eps_from_x0(x_t, t, x0))

    noise = torch.randn((T, *SHAPE), generator=seeded(4))
    terms, prior = variational_bound(exact, d, x, noise, variance, batch_size=64)
    expected = _point_bound_by_hand(betas, x, variance) / (D * math.log(2))
    assert float(bits_per_dim(terms, prior, D)) == pytest.approx(expected, abs=1e-3)
    assert float(bits_per_dim(terms, prior, D)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_gaussian_data_under_its_optimal_denoiser_meets_the_expected_bound(variance):
    """Data x_0 ~ N(mu, s^2) per dimension and its optimal denoiser E[x_0 | x_t]: the prior and KL terms average to
    their closed-form expectation, sum over t >= 1 of the variance mismatch plus coef1_t^2 Var(x_0 | x_t) /
    (2 sigma_t^2) (Var(x_0 | x_t) = s^2 (1 - abar) / (abar s^2 + 1 - abar)), within 4 standard errors of the mean
    over 128 images (~0.5 % of the bound). Continuous data: the decoder term is left out (tested on the grid above)."""
    T, mu, s, n, shape = 100, 0.1, 0.5, 128, (1, 32, 32)
    betas = make_betas("linear", T)
    d = GaussianDiffusion(betas, prediction_type="eps")

    def optimal(x_t, t):
        ab = d.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
        x0 = mu + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (x_t.double() - ab.sqrt() * mu)
        return d.predict_eps_from_x0(x_t.double(), t, x0)

    gen = seeded(7)
    per_image = []
    for _ in range(n):
        x = mu + s * torch.randn(shape, generator=gen, dtype=torch.float64)
        terms, prior = variational_bound(optimal, d, x, torch.randn((T, *shape), generator=gen, dtype=torch.float64),
                                         variance)  # fmt: skip
        per_image.append(float(terms[1:].sum() + prior) / (math.prod(shape) * math.log(2)))
    b = betas.double()
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    tilde = b * (1 - ac_prev) / (1 - ac)
    sigma2 = tilde if variance == "fixed_small" else b
    coef1 = b * ac_prev.sqrt() / (1 - ac)
    posterior = s**2 * (1 - ac) / (ac * s**2 + 1 - ac)
    kl = (0.5 * ((sigma2 / tilde).log() + tilde / sigma2 - 1) + coef1**2 * posterior / (2 * sigma2))[1:].sum()
    prior = 0.5 * (-1 - (1 - ac[-1]).log() + (1 - ac[-1]) + ac[-1] * (mu**2 + s**2))
    expected = float(kl + prior) / math.log(2)
    values = torch.tensor(per_image)
    stderr = float(values.std() / math.sqrt(n))
    assert stderr < 0.012 and abs(float(values.mean()) - expected) < 4 * stderr, (float(values.mean()), expected)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_each_kl_term_is_the_eps_error_times_its_weight(prediction_type, variance):
    """Ho et al. 2020 eq. 12: L_{t-1} - C = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - eps_theta||^2, C
    the variance mismatch (0 for fixed_small), for any network: here a random one, read as eps by its type."""
    T = 50
    betas = make_betas("linear", T)
    d = GaussianDiffusion(betas, prediction_type=prediction_type)
    x = _on_grid(seeded(5))
    noise = torch.randn((T, *SHAPE), generator=seeded(6))
    net = torch.nn.Conv2d(1, 1, 3, padding=1)

    def denoise(x_t, t):
        return net(x_t) * (1 + t.float()[:, None, None, None] / T)

    terms, _ = variational_bound(denoise, d, x, noise, variance)
    t = torch.arange(T)
    x0 = x.expand(T, *SHAPE)
    x_t = d.q_sample(x0, t, noise)
    with torch.no_grad():
        _, eps_theta = d.model_output_to_x0_eps(denoise(x_t, t).double(), x_t.double(), t)
    b = betas.double()
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    tilde = b * (1 - ac_prev) / (1 - ac)
    sigma2 = tilde if variance == "fixed_small" else b
    weight = b**2 / (2 * sigma2 * (1 - b) * (1 - ac))
    mismatch = D * 0.5 * ((sigma2 / tilde).log() + tilde / sigma2 - 1)
    error = (noise.double() - eps_theta).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(terms[1:], (weight * error + mismatch)[1:], rtol=1e-4, atol=1e-6)
    assert float((weight * error)[1:].sum()) > 1.0  # the random network is far from exact: not trivially 0


def test_normal_kl_and_the_decoder_by_hand():
    assert float(normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))) == 0.5
    kl = normal_kl(torch.tensor(0.0), torch.tensor(math.log(4.0)), torch.tensor(0.0), torch.tensor(0.0))
    assert float(kl) == pytest.approx(0.5 * (4 - 1 - math.log(4)))
    # a wide decoder: the bin's mass is ~ its width times the density; the 256 bins' masses sum to 1
    levels = torch.arange(256).double().div(127.5).sub(1.0)
    log_p = discretized_gaussian_log_likelihood(levels, torch.tensor(0.1), torch.tensor(math.log(0.5)))
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    density = torch.distributions.Normal(0.1, 0.5).log_prob(levels[127]).exp()
    assert float(log_p[127].exp()) == pytest.approx(float(density) * 2 / 255, rel=1e-4)


@pytest.mark.slow
def test_the_bound_falls_as_a_network_trains(shared_data):
    """A tiny U-Net on real digits (T = 50): the bound of held-out test digits, at fixed noise, falls with training
    (0, 20, 60 Adam steps: 16.4, 7.5, 3.7 bits/dim measured)."""
    from ddpm_lightning.data import MNISTDataModule
    from ddpm_lightning.nn.unet import UNet

    dm = MNISTDataModule(root=str(shared_data), download=False)
    train = dm.real_images("train", 512, seed=0)[0].float().div(127.5).sub(1.0)
    test = dm.real_images("test", 3, seed=0)[0].float().div(127.5).sub(1.0)
    T = 50
    d = GaussianDiffusion(make_betas("linear", T))
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=28, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attention_resolutions=(), num_groups=4)  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    noises = [torch.randn((T, 1, 28, 28), generator=seeded(10 + i)) for i in range(len(test))]
    gen = seeded(1)

    def bound() -> float:
        net.eval()
        bpd = [bits_per_dim(*variational_bound(lambda x, t: net(x, t, None), d, x, n), x.numel()) for x, n in
               zip(test, noises)]  # fmt: skip
        net.train()
        return float(torch.stack(bpd).mean())

    bounds = [bound()]
    for steps in (20, 40):
        for _ in range(steps):
            x = train[torch.randint(0, len(train), (16,), generator=gen)]
            t = torch.randint(0, T, (16,), generator=gen)
            loss = d.training_loss(lambda x_t, t_: net(x_t, t_, None), x, t, generator=gen).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        bounds.append(bound())
    assert bounds[0] > bounds[1] > bounds[2], bounds

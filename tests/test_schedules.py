"""Beta schedules: validity for every schedule and T, closed forms, pinned numbers, and error messages."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_lightning.schedules import (
    MAX_BETA,
    SCHEDULES,
    cosine_betas,
    linear_betas,
    make_betas,
    polynomial_betas,
    sigmoid_betas,
)


def _alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("num_timesteps", [10, 50, 1000, 4000])
def test_every_schedule_is_valid(name: str, num_timesteps: int) -> None:
    betas = make_betas(name, num_timesteps)
    assert betas.dtype == torch.float64
    assert betas.shape == (num_timesteps,)
    assert torch.isfinite(betas).all()
    assert (betas > 0).all() and (betas <= MAX_BETA).all()
    ac = _alphas_cumprod(betas)
    assert (ac[1:] < ac[:-1]).all() and ac[-1] > 0


def test_linear_endpoints_at_reference_t() -> None:
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_linear_rescaled_and_clipped_for_small_t() -> None:
    betas = linear_betas(10)  # endpoints x 1000/10: 0.01 ... 2.0, clipped to MAX_BETA
    assert betas[0].item() == pytest.approx(0.01)
    assert betas[1].item() == pytest.approx(0.01 + (2.0 - 0.01) / 9)
    assert betas[-1].item() == MAX_BETA
    assert (betas[5:] == MAX_BETA).all() and (betas[:5] < MAX_BETA).all()
    # sum of betas (total noise) is independent of T before clipping
    assert linear_betas(4000).sum().item() == pytest.approx(linear_betas(1000).sum().item(), rel=1e-12)


@pytest.mark.parametrize("t", [0, 1, 250, 500, 998])
def test_cosine_alphas_cumprod_matches_closed_form(t: int) -> None:
    num_timesteps, s = 1000, 0.008

    def f(u: float) -> float:
        return math.cos((u / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    ac = _alphas_cumprod(cosine_betas(num_timesteps, s=s))
    # index t is abar(t+1) on the paper's grid (t=0 is one step of noise); the last one is clipped
    assert ac[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)


def test_sigmoid_alphas_cumprod_matches_closed_form() -> None:
    num_timesteps, start, end, tau = 100, -3.0, 3.0, 0.7

    def sig(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    ac = _alphas_cumprod(sigmoid_betas(num_timesteps, start=start, end=end, tau=tau))
    for t in [0, 10, 50, 98]:
        u = (t + 1) / num_timesteps
        expected = (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
        assert ac[t].item() == pytest.approx(expected, rel=1e-10)


# alphas_cumprod[-1] at T=1000, computed once with this code and pinned. Cross-checks: linear 4.04e-5 is the
# well-known DDPM value; cosine = abar(999) * (1 - 0.999), abar(999) ~ (pi/2 * 0.001/1.008)^2.
PINNED_LAST_ALPHAS_CUMPROD = {
    "linear": 4.0358297653756754e-05,
    "cosine": 2.4287669070348542e-09,
    "sigmoid": 3.0027919974932843e-07,
    "polynomial": 1.139265864027648e-03,
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_pinned_final_alphas_cumprod(name: str) -> None:
    ac = _alphas_cumprod(make_betas(name, 1000))
    assert ac[-1].item() == pytest.approx(PINNED_LAST_ALPHAS_CUMPROD[name], rel=1e-9)


def test_polynomial_closed_form_and_shape_against_linear() -> None:
    num_timesteps = 1000
    linear = linear_betas(num_timesteps)
    warmup = polynomial_betas(num_timesteps, tau=1, phase="warmup")
    cooloff = polynomial_betas(num_timesteps, tau=1, phase="cooloff")
    # same endpoints as linear
    for betas in (warmup, cooloff):
        assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    # the closed forms of the docstring, written out independently
    t_mid = torch.tensor([333, 499, 666])
    u = t_mid.double() / (num_timesteps - 1)
    assert torch.allclose(warmup[t_mid], 1e-4 + (0.02 - 1e-4) * u**2)
    assert torch.allclose(cooloff[t_mid], 1e-4 + (0.02 - 1e-4) * (1 - (1 - u) ** 2))
    middle = slice(1, -1)
    assert (warmup[middle] < linear[middle]).all()
    assert (cooloff[middle] > linear[middle]).all()
    # higher degree: flatter for longer
    assert (polynomial_betas(num_timesteps, tau=3)[middle] < warmup[middle]).all()


def test_make_betas_passes_params() -> None:
    betas = make_betas("linear", 1000, beta_start=1e-3, beta_end=0.01)
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(0.01)
    assert torch.equal(
        make_betas("polynomial", 100, tau=2, phase="cooloff"), polynomial_betas(100, tau=2, phase="cooloff")
    )


def test_unknown_schedule_name() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'foo'; choose one of: linear, cosine, sigmoid, polynomial"):
        make_betas("foo", 1000)


def test_unknown_param_names_accepted_ones() -> None:
    with pytest.raises(ValueError, match="unknown parameter.*beta_max.*accepted: beta_start, beta_end"):
        make_betas("linear", 1000, beta_max=0.02)
    with pytest.raises(ValueError, match="accepted: s, max_beta"):
        make_betas("cosine", 1000, tau=1.0)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("num_timesteps", [1, 0, -5])
def test_too_few_timesteps(name: str, num_timesteps: int) -> None:
    with pytest.raises(ValueError, match=f"num_timesteps must be >= 2, got {num_timesteps}"):
        make_betas(name, num_timesteps)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("linear", {"beta_start": 0.0}),  # beta = 0 at t=0
        ("linear", {"beta_start": 0.05, "beta_end": -0.01}),  # negative betas
        ("sigmoid", {"start": 1.0, "end": 1.0}),  # 0 / 0: NaN betas
        ("cosine", {"max_beta": 1.0}),  # beta = 1 at the last step: alphas_cumprod = 0
    ],
)
def test_absurd_params_rejected(name: str, params: dict) -> None:
    with pytest.raises(ValueError, match=f"schedule '{name}' .* is invalid"):
        make_betas(name, 1000, **params)


def test_polynomial_param_validation() -> None:
    with pytest.raises(ValueError, match="tau must be a positive integer"):
        polynomial_betas(100, tau=0)
    with pytest.raises(ValueError, match="tau must be a positive integer"):
        polynomial_betas(100, tau=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown phase 'ramp'; choose one of: warmup, cooloff"):
        make_betas("polynomial", 100, phase="ramp")

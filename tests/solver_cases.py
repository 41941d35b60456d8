"""Shared cases of the solver tests: small diffusions, a stand-in network, the registry's solvers by name."""

from __future__ import annotations

import torch

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.samplers import DenoiseFn
from ddpm_lightning.sampling import SAMPLERS, SamplingConfig, sample
from ddpm_lightning.schedules import make_betas

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


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_diffusion(
    prediction_type: str = "eps", schedule: str = "linear", num_timesteps: int = 1000
) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas(schedule, num_timesteps), prediction_type=prediction_type)


def vp_coefficients(d: GaussianDiffusion, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma_vp) (B, 1, 1, 1) float64 at (B,) long or fractional t (log-sigma interpolation)."""
    alpha, sigma = d.alpha_sigma_from_ve_sigma(d.ve_sigma_at(t).reshape(-1, 1, 1, 1))
    return alpha, sigma


def output_from_x0(d: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The model output in d.prediction_type whose x0 is ``x0`` at (x_t, t), in float64, cast to x_t's dtype."""
    alpha, sigma = vp_coefficients(d, t)
    x, x0 = x_t.double(), x0.double()
    eps = (x - alpha * x0) / sigma
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[d.prediction_type].to(x_t.dtype)


class StandIn(torch.nn.Module):
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
        alpha, sigma = vp_coefficients(self.d, t)
        u = t.double()[:, None] / self.d.num_timesteps  # (B, 1)
        emb = self.emb(torch.cat([torch.sin(3 * u), torch.cos(5 * u), u], dim=1))[:, :, None, None]
        x64 = x.double()
        x0 = alpha * 0.36 / (alpha**2 * 0.36 + sigma**2) * x64 + 0.2 * self.conv2(torch.tanh(self.conv1(x64) + emb))
        return output_from_x0(self.d, x, t, x0)

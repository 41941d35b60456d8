"""Guidance in a limited interval of noise levels (Kynkaenniemi et al. 2024): ``sampling.guidance_interval``."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.module import DiffusionModule
from ddpm_lightning.samplers import guided_denoise_fn
from ddpm_lightning.sampling import SamplingConfig, sample
from ddpm_lightning.schedules import make_betas

NULL = 5


class _Recorder:
    """model(x, t, y) = x (y + 1) / 10 + t / 1000, recording each call's batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return x * (y + 1).to(x).view(-1, 1, 1, 1) / 10 + t.to(x).view(-1, 1, 1, 1) / 1000


def _cosine_sigma(t: int, T: int = 1000, s: float = 0.008) -> float:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of the cosine schedule (Nichol & Dhariwal 2021), in closed form."""
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = f(t + 1) / f(0)
    return math.sqrt((1 - abar) / abar)


def test_guides_inside_the_interval_and_is_the_conditional_output_outside() -> None:
    d = GaussianDiffusion(make_betas("cosine", 1000))
    t = torch.tensor([999, 700, 400, 100, 10])
    sigmas = [_cosine_sigma(int(k)) for k in t]  # 2e4, 2.0, 0.74, 0.17, 0.03 (before the schedule's beta clip)
    assert sigmas[1] > 1 > sigmas[2] > 0.5 > sigmas[3] > 0.1 > sigmas[4]
    config = SamplingConfig(guidance_scale=3.0, guidance_interval=(0.1, 2.5))
    inside = config.guide_at(d)(t)
    assert inside.tolist() == [False, True, True, True, False]

    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4])
    model = _Recorder()
    out = guided_denoise_fn(model, y, 3.0, NULL, config.guide_at(d))(x, t)
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, NULL))
    expected = torch.where(inside.view(-1, 1, 1, 1), uncond + 3.0 * (cond - uncond), cond)
    torch.testing.assert_close(out, expected)
    assert model.batches[0] == 10  # a batch guided anywhere is one [cond; uncond] pass

    model = _Recorder()
    outside = guided_denoise_fn(model, y, 3.0, NULL, config.guide_at(d))(x, torch.full((5,), 999))
    assert model.batches == [5]  # guided nowhere: one conditional pass, half the work
    torch.testing.assert_close(outside, _Recorder()(x, torch.full((5,), 999), y))


def test_unipc_guides_the_steps_whose_noise_level_is_inside() -> None:
    """UniPC at 10 steps on cosine T = 1000 evaluates at t = 999, 899, ..., 100; of those, the levels in (0.3, 5]
    are t = 799 ... 200 (sigma 3.10 ... 0.34): 7 guided passes of 2B, 3 conditional ones of B."""
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction_type="v")
    levels = [_cosine_sigma(t) for t in range(999, 0, -100)]
    assert sum(0.3 < s <= 5 for s in levels) == 7
    y = torch.tensor([1, 2])
    config = SamplingConfig(sampler="unipc", num_steps=10, guidance_scale=3.0, guidance_interval=(0.3, 5.0))
    model = _Recorder()
    sample(guided_denoise_fn(model, y, 3.0, NULL, config.guide_at(d)), d, (2, 1, 4, 4), config)
    assert model.batches == [2, 2, 4, 4, 4, 4, 4, 4, 4, 2]


def test_the_whole_range_is_plain_guidance_and_an_empty_one_is_guidance_1() -> None:
    torch.manual_seed(0)
    model = DiffusionModule(
        in_channels=1, image_size=8, num_classes=3, conditional=True, base_channels=8, channel_mults=(1, 2),
        num_res_blocks=1, num_groups=4, num_timesteps=100, prediction_type="v",
    )  # fmt: skip
    with torch.no_grad():
        for p in model.net.parameters():  # the output layer starts at zero: cond = uncond until weights move
            p.add_(0.1 * torch.randn_like(p))
    labels = [0, 1, 2, 0]

    def draw(**kw) -> torch.Tensor:
        args = dict(sampler="unipc", num_steps=8, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
        return model.sample(4, labels=labels, **(args | kw))

    plain = draw()
    assert torch.equal(draw(guidance_interval=(0.0, math.inf)), plain)
    assert torch.equal(draw(guidance_interval=[1e6, math.inf]), draw(guidance_scale=1.0))  # above sigma_max
    middle = draw(guidance_interval=(0.3, 5.0))
    assert not torch.equal(middle, plain) and not torch.equal(middle, draw(guidance_scale=1.0))


def test_settings_round_trip_and_one_line_errors() -> None:
    config = SamplingConfig.of({"sampler": "unipc", "guidance_scale": 3.0, "guidance_interval": [0.3, 5]})
    assert config.guidance_interval == (0.3, 5.0)
    assert config.to_dict()["guidance_interval"] == [0.3, 5.0]  # plain values for YAML / checkpoints
    assert SamplingConfig.of(config.to_dict()) == config
    assert config.tag() == "unipc50-w3-gi0.3-5" and config.tag(conditional=False) == "unipc50"
    assert "guidance_interval" not in SamplingConfig().to_dict()  # unset: cached result keys stay what they were
    assert SamplingConfig().guide_at(GaussianDiffusion(make_betas("linear", 10))) is None
    for bad in ([1.0, 0.5], [-0.1, 2.0], [0.3], "0.3,5", [True, 2.0], [0.1, math.nan], [math.inf, math.inf]):
        with pytest.raises(ValueError, match=r"guidance_interval must be \[sigma_lo, sigma_hi\]"):
            SamplingConfig(guidance_interval=bad)


def test_the_sample_command_takes_the_flag() -> None:
    from ddpm_lightning.commands import sample as command
    from ddpm_lightning.commands.base import build_parser, sampling_from

    cfg = build_parser(command, "ddpm sample").parse_args(
        ["--ckpt_path", "x.ckpt", "--guidance_scale", "3", "--guidance_interval", "[0.3, 5]"]
    )
    assert sampling_from(cfg, SamplingConfig()).guidance_interval == (0.3, 5.0)

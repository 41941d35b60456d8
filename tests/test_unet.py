"""The DDPM U-Net: shapes, the paper's parameter count, conditioning, validation errors and trainability."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_lightning.nn import UNet
from ddpm_lightning.nn.layers import SinusoidalTimeEmbedding

#: a few-thousand-parameter configuration that runs in milliseconds on CPU
TINY = dict(base_channels=16, num_res_blocks=1, num_groups=8)


def tiny_unet(in_channels: int = 1, image_size: int = 16, **kwargs) -> UNet:
    return UNet(in_channels, image_size, **{"channel_mults": (1, 2), **TINY, **kwargs})


def perturb_(net: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its initial value: zero-initialised layers otherwise hide all inputs."""
    with torch.no_grad():
        for param in net.parameters():
            param.add_(scale * torch.randn_like(param))
    return net


def num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("image_size", "in_channels", "channel_mults", "attention_resolutions", "num_classes"),
    [
        (28, 1, (1, 2, 2), (14,), None),  # MNIST: 28 -> 14 -> 7
        (28, 3, (1, 2, 2), (7,), 10),
        (32, 3, (1, 2, 2), (16,), None),
        (32, 1, (1, 2), (), 10),
        (64, 3, (1, 2, 2, 2), (16, 8), 5),
        (64, 1, (1, 1, 2, 2), (), None),
    ],
)
def test_output_shape(image_size, in_channels, channel_mults, attention_resolutions, num_classes):
    net = UNet(
        in_channels,
        image_size,
        channel_mults=channel_mults,
        attention_resolutions=attention_resolutions,
        num_classes=num_classes,
        **TINY,
    )
    x = torch.randn(2, in_channels, image_size, image_size)
    y = None if num_classes is None else torch.tensor([0, num_classes - 1])
    out = net(x, torch.tensor([0, 999]), y)
    assert out.shape == x.shape
    assert out.dtype == x.dtype


def test_out_channels_and_heads():
    net = tiny_unet(3, out_channels=6, num_heads=4, attention_resolutions=(16, 8))
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert out.shape == (2, 6, 16, 16)


def test_cifar10_parameter_count_matches_ddpm_paper():
    # Ho et al. 2020, Sec. 4: "Our CIFAR10 model has 35.7 million parameters"
    net = UNet(3, 32, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,))
    n = num_params(net)
    assert abs(n - 35.7e6) <= 0.1e6, n
    assert n == 35_746_307  # same as openai/improved-diffusion's port of the DDPM model


def test_conditional_adds_only_the_class_table():
    kwargs = dict(channel_mults=(1, 2), attention_resolutions=(8,), **TINY)
    extra = num_params(UNet(1, 16, num_classes=10, **kwargs)) - num_params(UNet(1, 16, **kwargs))
    assert extra == (10 + 1) * 4 * TINY["base_channels"]  # 10 classes + null, width 4 * base


def test_sinusoidal_embedding_pinned_values():
    emb = SinusoidalTimeEmbedding(8)
    s = emb.sinusoids(torch.tensor([0, 1, 500]))  # (3, 8): [sin(t w_0..3), cos(t w_0..3)]
    w = torch.tensor([10_000 ** (-i / 3) for i in range(4)])  # w_i = 10000^(-i / (dim/2 - 1))
    assert torch.equal(s[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(s[1], torch.cat([w.sin(), w.cos()]))
    torch.testing.assert_close(s[2, 0], torch.tensor(math.sin(500.0)))
    assert torch.equal(emb.sinusoids(torch.tensor([7])), emb.sinusoids(torch.tensor([7.0])))  # int == float t


def test_output_depends_on_t_and_the_null_label_differs_from_a_real_label():
    net = perturb_(tiny_unet(num_classes=3, attention_resolutions=(8,))).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 10])
    with torch.no_grad():
        null = net(x, t)
        assert torch.equal(null, net(x, t, torch.full((2,), net.null_label)))  # y=None is the null label
        real = net(x, t, torch.tensor([0, 2]))
        other_t = net(x, torch.tensor([500, 500]))
    assert net.null_label == 3
    assert (null - real).abs().amax() > 1e-3
    assert (null - other_t).abs().amax() > 1e-3


def test_eval_is_deterministic_and_dropout_acts_in_train():
    net = perturb_(tiny_unet(dropout=0.5, attention_resolutions=(8,)))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 4])
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t))
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x, t), net(x, t))


def test_channels_last_matches_contiguous():
    net = perturb_(tiny_unet(3, attention_resolutions=(16, 8), num_heads=2)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    with torch.no_grad():
        expected = net(x, t)
        net_cl = net.to(memory_format=torch.channels_last)
        got = net_cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_every_parameter_gets_a_gradient():
    net = perturb_(tiny_unet(num_classes=2, attention_resolutions=(16, 8)))
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    net(x, t, y).square().mean().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_loss_decreases_on_a_fixed_batch():
    # from the default (zero-initialised output) state: inner gradients are zero on step one, not afterwards
    net = tiny_unet(num_classes=2, attention_resolutions=(8,))
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 100, 900]), torch.tensor([0, 1, 2, 0])
    target = torch.randn_like(x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(net(x, t, y), target)
        opt.zero_grad()
        loss.backward()
        for name, param in net.named_parameters():
            assert param.grad is not None, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(image_size=28, channel_mults=(1, 2, 2, 2)),
            r"image_size 28 cannot be halved 3 times \(channel_mults has 4 levels\); use at most 3 levels, "
            r"e.g. channel_mults=\(1, 2, 2\), or resize the images to 32",
        ),
        (
            dict(image_size=7, channel_mults=(1, 2)),
            r"use at most 1 level, e.g. channel_mults=\(1,\).*resize the images to 8",
        ),
        (dict(attention_resolutions=(16,)), r"valid values .* are \[28, 14, 7\]"),
        (dict(base_channels=20, num_groups=8), r"base_channels has 20 channels.*num_groups=8"),
        (dict(base_channels=32, num_groups=8, num_heads=3), r"num_heads=3"),
        (dict(channel_mults=()), r"at least one level"),
        (dict(channel_mults=(1, 0)), r"channel_mults\[1\] must be a positive integer"),
        (dict(in_channels=0), r"in_channels must be a positive integer"),
        (dict(num_classes=0), r"num_classes must be a positive integer"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(base_channels=2, num_groups=1, channel_mults=(1,)), r"even width >= 4"),
    ],
)
def test_invalid_configuration_raises(kwargs, match):
    args = dict(in_channels=1, image_size=28, base_channels=16, channel_mults=(1, 2, 2), num_groups=8)
    with pytest.raises(ValueError, match=match):
        UNet(**{**args, **kwargs})


def test_invalid_inputs_raise():
    uncond = tiny_unet()
    cond = tiny_unet(num_classes=10)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 16, 16\); got \(2, 1, 32, 32\)"):
        uncond(torch.randn(2, 1, 32, 32), t)
    with pytest.raises(ValueError, match=r"got \(2, 3, 16, 16\)"):
        uncond(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(2,\); got \(\)"):
        uncond(x, torch.tensor(1))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        _ = uncond.null_label
    for bad in ([-1, 0], [0, 11]):
        with pytest.raises(ValueError, match=r"class labels in \[0, 10\]"):
            cond(x, t, torch.tensor(bad))
    with pytest.raises(ValueError, match=r"y must have shape"):
        cond(x, t, torch.tensor([1]))
    assert cond(x, t, torch.tensor([10, 0])).shape == x.shape  # the null label itself is valid


def test_torch_compile_traces_one_graph():
    # fullgraph=True fails on any graph break (data-dependent Python control flow); "aot_eager" also traces
    # the backward-ready graph but skips inductor's slow C++ code generation, keeping this test CPU-cheap
    net = perturb_(tiny_unet(num_classes=2, attention_resolutions=(8,))).eval()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 2])
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), net(x, t, y), atol=1e-4, rtol=1e-4)

"""Building blocks of the DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Appendix B).

Shapes: ``B`` batch, ``C`` channels, ``H``/``W`` spatial size, ``E`` time-embedding width
(``4 * base_channels``), ``nh`` attention heads, ``hd = C // nh`` head width, ``L = H * W`` tokens.

The blocks mirror the authors' TensorFlow code (``diffusion_tf/models/unet.py``) and its PyTorch port in
openai/improved-diffusion: the layers that end a residual branch (second conv of a ResBlock, attention output
projection) start at zero, so every block starts as the identity.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: base of the sinusoid wavelengths, as in Vaswani et al. 2017 ("Attention Is All You Need"), Sec. 3.5
MAX_PERIOD = 10_000.0

#: GroupNorm's epsilon: PyTorch's default (DDPM's TensorFlow code and diffusers' DDPM ports use 1e-6)
GROUP_NORM_EPS = 1e-5

#: how a stride-2 Downsample pads: "symmetric" = one pixel on every side (improved-diffusion);
#: "bottom_right" = one row and column at the bottom and right only, TensorFlow's "SAME" padding for a stride-2
#: 3x3 convolution on an even size, as in the DDPM authors' code (diffusers: ``downsample_padding=0``)
DownsamplePadding = Literal["symmetric", "bottom_right"]


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (DDPM's ``init_scale=0.``)."""
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


def check_divisible(name: str, channels: int, divisor_name: str, divisor: int) -> None:
    """Raise a ``ValueError`` unless ``channels`` is a multiple of ``divisor``."""
    if channels % divisor != 0:
        raise ValueError(
            f"{name} has {channels} channels, which is not divisible by {divisor_name}={divisor}; "
            f"pick base_channels / channel_mults so that every width is a multiple of {divisor}"
        )


class SinusoidalTimeEmbedding(nn.Module):
    """Timestep ``t`` -> time embedding of width ``4 * dim`` (Ho et al. 2020, ``get_timestep_embedding``).

    Sinusoids of Vaswani et al. 2017, Sec. 3.5: ``[sin(t w_i), cos(t w_i)]`` with
    ``w_i = 10000^(-i / (dim/2 - freq_shift))``, then ``Linear(dim, 4 dim) -> SiLU -> Linear(4 dim, 4 dim)``.
    The output comes *before* the SiLU that every ResBlock applies, so a class embedding can be added first.

    ``freq_shift=1, flip_sin_to_cos=False`` is DDPM's embedding; diffusers' UNet2DModel defaults to
    ``freq_shift=0, flip_sin_to_cos=True`` (``[cos, sin]`` with ``w_i = 10000^(-i / (dim/2))``).
    """

    def __init__(self, dim: int, freq_shift: int = 1, flip_sin_to_cos: bool = False) -> None:
        super().__init__()
        if dim < 4 or dim % 2 != 0:
            raise ValueError(f"the sinusoidal time embedding needs an even width >= 4 (base_channels); got {dim}")
        if isinstance(freq_shift, bool) or not isinstance(freq_shift, int) or not 0 <= freq_shift < dim // 2:
            raise ValueError(f"time_freq_shift must be an integer in [0, {dim // 2}); got {freq_shift!r}")
        self.dim, self.freq_shift, self.flip_sin_to_cos = dim, freq_shift, flip_sin_to_cos
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, 4 * dim)

    def sinusoids(self, t: Tensor) -> Tensor:
        """(B,) integer or float timesteps -> (B, dim) float32 sinusoids, computed on ``t``'s device."""
        half = self.dim // 2
        exponent = torch.arange(half, device=t.device, dtype=torch.float32) / (half - self.freq_shift)
        freqs = torch.exp(-math.log(MAX_PERIOD) * exponent)  # (dim/2,)
        angles = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, dim/2)
        waves = [angles.cos(), angles.sin()] if self.flip_sin_to_cos else [angles.sin(), angles.cos()]
        return torch.cat(waves, dim=1)  # (B, dim)

    def forward(self, t: Tensor) -> Tensor:
        """(B,) timesteps -> (B, 4 dim) embedding."""
        emb = self.sinusoids(t).to(self.linear1.weight.dtype)  # (B, dim)
        return self.linear2(F.silu(self.linear1(emb)))  # (B, E)


class ResBlock(nn.Module):
    """Residual block with a time-embedding bias (Ho et al. 2020, Appendix B; Wide ResNet, Zagoruyko 2016).

    ``GroupNorm -> SiLU -> conv3x3 -> + Linear(emb) -> GroupNorm -> SiLU -> Dropout -> conv3x3`` plus a 1x1
    conv shortcut when the width changes. ``emb`` is the time (+ class) embedding already passed through
    SiLU (the U-Net applies it once for all blocks, as DDPM's ``dense(nonlinearity(temb))`` does per block).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float,
        num_groups: int,
        eps: float = GROUP_NORM_EPS,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1))
        if in_channels == out_channels:
            self.skip: nn.Module = nn.Identity()
        else:
            self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1)  # DDPM's "nin" shortcut

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x (B, C_in, H, W), emb (B, E) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.emb_proj(emb)[:, :, None, None]  # broadcast (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual (Ho et al. 2020, Appendix B; Wang et al. 2018, non-local nets).

    ``GroupNorm -> 1x1 conv to q, k, v -> scaled_dot_product_attention over the H*W positions -> 1x1 conv``.
    The reshapes are views for both contiguous and channels_last inputs; with channels_last every head's
    features are contiguous in memory, as the fused SDPA kernels like them.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int, eps: float = GROUP_NORM_EPS) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1; got {num_heads}")
        check_divisible(f"an attention block ({channels} channels)", channels, "num_heads", num_heads)
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = zero_module(nn.Conv2d(channels, channels, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        qkv = qkv.reshape(b, 3 * self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)  # (B, 3nh, L, hd)
        q, k, v = qkv.chunk(3, dim=1)  # each (B, nh, L, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, hd), softmax(q k^T / sqrt(hd)) v
        out = out.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a 3x3 convolution of stride 2 (DDPM's ``downsample(with_conv=True)``).

    ``padding`` is a :data:`DownsamplePadding`: both pad one pixel in all and keep the same weights; they differ in
    which input pixels the border outputs see.
    """

    def __init__(self, channels: int, padding: DownsamplePadding = "symmetric") -> None:
        super().__init__()
        if padding not in get_args(DownsamplePadding):
            raise ValueError(
                f"unknown downsample_padding {padding!r}; choose one of: {', '.join(get_args(DownsamplePadding))}"
            )
        self.bottom_right = padding == "bottom_right"
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0 if self.bottom_right else 1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, H/2, W/2)."""
        if self.bottom_right:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom): (B, C, H + 1, W + 1)
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2 then a 3x3 convolution (DDPM's ``upsample(with_conv=True)``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A ``Sequential`` that hands the embedding to its ResBlocks (a fixed structure, no data branches)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        """x (B, C_in, H, W), emb (B, E) -> (B, C_out, H', W')."""
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x

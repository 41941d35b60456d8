"""The DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Appendix B).

A PixelCNN++-style U-Net (Salimans et al. 2017) with Wide-ResNet blocks, group normalisation and
self-attention at chosen resolutions, as in the authors' ``diffusion_tf/models/unet.py`` and
openai/improved-diffusion. With ``base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
attention_resolutions=(16,)`` on 32x32 images it has the paper's 35.7M parameters (CIFAR-10 model).

Optional class conditioning for classifier-free guidance (Ho & Salimans 2022): a learned class embedding is
added to the time embedding; index ``num_classes`` is the "null" label that stands for "no class".

The network sees only the integer (or float) timestep ``t``; the noise schedule lives in the diffusion.

The options ``norm_eps``, ``downsample_padding``, ``time_freq_shift``, ``time_flip_sin_to_cos`` and
``attention_head_dim`` cover the ways diffusers' ``UNet2DModel`` can differ (its DDPM ports, e.g.
``google/ddpm-cifar10-32``: ``norm_eps=1e-6, downsample_padding="bottom_right"``); their defaults are the
layout above. :mod:`ddpm_lightning.nn.diffusers_layout` maps between the two; the network never reads files (the
module hands it a diffusers folder's weights, read by :mod:`ddpm_lightning.hub_import`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lightning.nn.layers import (
    GROUP_NORM_EPS,
    AttentionBlock,
    Downsample,
    DownsamplePadding,
    EmbedSequential,
    ResBlock,
    SinusoidalTimeEmbedding,
    Upsample,
    check_divisible,
    zero_module,
)

#: width of the time embedding relative to ``base_channels`` (DDPM's ``temb_ch = ch * 4``)
EMB_MULT = 4

#: a ResBlock or AttentionBlock constructor with the shared arguments bound, taking channel widths
Block = Callable[..., nn.Module]


def _max_levels(image_size: int) -> int:
    """How many levels a U-Net can have: one more than the times ``image_size`` halves exactly."""
    levels = 1
    while image_size % 2 == 0:
        image_size //= 2
        levels += 1
    return levels


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


def level_resolutions(image_size: int, channel_mults: Sequence[int]) -> list[int]:
    """Feature-map side length per level, e.g. ``(28, (1, 2, 2)) -> [28, 14, 7]``; ValueError if not exact."""
    halvings = len(channel_mults) - 1
    if image_size % 2**halvings != 0:
        levels = min(_max_levels(image_size), len(channel_mults))
        resize_to = -(-image_size // 2**halvings) * 2**halvings
        raise ValueError(
            f"image_size {image_size} cannot be halved {halvings} times "
            f"(channel_mults has {len(channel_mults)} levels); "
            f"use at most {levels} level{'s' * (levels > 1)}, "
            f"e.g. channel_mults={tuple(channel_mults[:levels])}, or resize the images to {resize_to}"
        )
    return [image_size // 2**level for level in range(len(channel_mults))]


def _validate(
    base_channels: int,
    channel_mults: Sequence[int],
    resolutions: list[int],
    attention_resolutions: Sequence[int],
    dropout: float,
    heads: tuple[str, int],
    num_groups: int,
) -> None:
    """Check widths against ``num_groups`` / ``heads`` (the option that splits widths into attention heads:
    ``("num_heads", n)`` or ``("attention_head_dim", d)``) and attention resolutions against the levels."""
    bad = [r for r in attention_resolutions if r not in resolutions]
    if bad:
        raise ValueError(
            f"attention_resolutions {list(attention_resolutions)} has {bad}, not a level resolution; "
            f"valid values (feature-map side lengths) are {resolutions}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")
    check_divisible("base_channels", base_channels, "num_groups", num_groups)  # so is every wider level
    for level, mult in enumerate(channel_mults):
        if resolutions[level] in attention_resolutions or level == len(channel_mults) - 1:  # middle attends
            check_divisible(f"attention at level {level}", base_channels * mult, *heads)


def _build_down(
    base_channels: int,
    widths: list[int],
    attends: list[bool],
    num_res_blocks: int,
    res: Block,
    attn: Block,
    down: Block,
) -> tuple[nn.ModuleList, list[int]]:
    """Encoder blocks, each saving one skip, and the width of every skip (``conv_in``'s first)."""
    blocks, skip_widths, ch = nn.ModuleList(), [base_channels], base_channels
    for level, width in enumerate(widths):
        for _ in range(num_res_blocks):
            layers = [res(ch, width)] + ([attn(width)] if attends[level] else [])
            blocks.append(EmbedSequential(*layers))
            ch = width
            skip_widths.append(ch)
        if level != len(widths) - 1:
            blocks.append(EmbedSequential(down(ch)))
            skip_widths.append(ch)
    return blocks, skip_widths


def _build_up(
    widths: list[int],
    attends: list[bool],
    num_res_blocks: int,
    skip_widths: list[int],
    res: Block,
    attn: Block,
) -> nn.ModuleList:
    """Decoder blocks, deepest first, each taking one skip (concatenated on C); pops ``skip_widths``."""
    blocks, ch = nn.ModuleList(), widths[-1]
    for level in reversed(range(len(widths))):
        for i in range(num_res_blocks + 1):
            layers = [res(ch + skip_widths.pop(), widths[level])]
            ch = widths[level]
            if attends[level]:
                layers.append(attn(ch))
            if level != 0 and i == num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(EmbedSequential(*layers))
    assert not skip_widths, "every skip connection is consumed once"
    return blocks


#: the constructor arguments that give the network's shape beyond the data-decided sizes (channels, image size,
#: classes); DiffusionModule takes each under the same name and passes them on
SHAPE_OPTIONS = (
    "base_channels",
    "channel_mults",
    "num_res_blocks",
    "attention_resolutions",
    "dropout",
    "num_heads",
    "num_groups",
    "norm_eps",
    "downsample_padding",
    "time_freq_shift",
    "time_flip_sin_to_cos",
    "attention_head_dim",
)


class UNet(nn.Module):
    """Noise-prediction U-Net: ``(x_t, t, y) -> output`` of the shape of ``x_t`` (``out_channels`` channels).

    Args:
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10, any positive number).
        image_size: side length of the square input; must halve exactly ``len(channel_mults) - 1`` times.
        base_channels: width of the first level; level ``i`` is ``base_channels * channel_mults[i]`` wide.
        channel_mults: width multiplier per level; one level per entry, halving the resolution between levels.
        num_res_blocks: ResBlocks per level on the way down (``num_res_blocks + 1`` on the way up).
        attention_resolutions: feature-map side lengths that get self-attention after every ResBlock
            (e.g. ``(16,)`` for 32x32 images). The middle block always attends.
        dropout: dropout probability inside the ResBlocks (0.1 for DDPM's CIFAR-10 model).
        num_classes: number of classes for class conditioning, or ``None`` for an unconditional network.
        num_heads: attention heads; every attended width must be divisible by it.
        num_groups: GroupNorm groups (32 in DDPM); every width must be divisible by it.
        out_channels: output channels; defaults to ``in_channels`` (predicting ``eps``, ``x_start`` or ``v``).
        norm_eps: epsilon of every GroupNorm (1e-6 in DDPM's TensorFlow code and diffusers' ports of it).
        downsample_padding: ``"symmetric"`` or ``"bottom_right"`` (DDPM's TensorFlow "SAME" padding), see
            :data:`ddpm_lightning.nn.layers.DownsamplePadding`.
        time_freq_shift: ``w_i = 10000^(-i / (base_channels/2 - time_freq_shift))`` in the sinusoidal time
            embedding (1: DDPM; 0: diffusers' default).
        time_flip_sin_to_cos: order the sinusoids ``[cos, sin]`` (diffusers' default) instead of ``[sin, cos]``.
        attention_head_dim: channels per attention head, so a level of width ``w`` gets ``w // attention_head_dim``
            heads (as diffusers counts them); ``None``: ``num_heads`` heads at every level.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_groups: int = 32,
        out_channels: int | None = None,
        norm_eps: float = GROUP_NORM_EPS,
        downsample_padding: DownsamplePadding = "symmetric",
        time_freq_shift: int = 1,
        time_flip_sin_to_cos: bool = False,
        attention_head_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_positive(
            in_channels=in_channels,
            image_size=image_size,
            base_channels=base_channels,
            num_res_blocks=num_res_blocks,
            num_classes=num_classes,
            num_heads=num_heads,
            num_groups=num_groups,
            out_channels=out_channels,
            attention_head_dim=attention_head_dim,
        )
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0; got {norm_eps}")
        channel_mults, attention_resolutions = tuple(channel_mults), tuple(attention_resolutions)
        if not channel_mults:
            raise ValueError("channel_mults must have at least one level, e.g. (1, 2, 2)")
        _check_positive(**{f"channel_mults[{i}]": m for i, m in enumerate(channel_mults)})
        resolutions = level_resolutions(image_size, channel_mults)
        heads = ("attention_head_dim", attention_head_dim) if attention_head_dim else ("num_heads", num_heads)
        _validate(base_channels, channel_mults, resolutions, attention_resolutions, dropout, heads, num_groups)

        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.out_channels = out_channels or in_channels
        #: the shape options beyond the attributes above, read by the diffusers mapping
        given = locals()
        self.options: dict[str, Any] = {name: given[name] for name in SHAPE_OPTIONS}
        emb_dim = EMB_MULT * base_channels
        self.time_embed = SinusoidalTimeEmbedding(base_channels, time_freq_shift, time_flip_sin_to_cos)
        # one row per class plus the null label (index num_classes) for classifier-free guidance
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None

        widths = [base_channels * m for m in channel_mults]
        attends = [r in attention_resolutions for r in resolutions]
        res = partial(ResBlock, emb_dim=emb_dim, dropout=dropout, num_groups=num_groups, eps=norm_eps)

        def attn(ch: int) -> AttentionBlock:
            n = ch // attention_head_dim if attention_head_dim else num_heads
            return AttentionBlock(ch, num_heads=n, num_groups=num_groups, eps=norm_eps)

        down = partial(Downsample, padding=downsample_padding)
        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)
        self.down, skip_widths = _build_down(base_channels, widths, attends, num_res_blocks, res, attn, down)
        ch = widths[-1]
        self.middle = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.up = _build_up(widths, attends, num_res_blocks, skip_widths, res, attn)
        ch = widths[0]
        self.norm_out = nn.GroupNorm(num_groups, ch, eps=norm_eps)
        self.conv_out = zero_module(nn.Conv2d(ch, self.out_channels, kernel_size=3, padding=1))

    @property
    def null_label(self) -> int:
        """The class index meaning "no class" (``num_classes``), for classifier-free guidance."""
        if self.num_classes is None:
            raise ValueError("this UNet is unconditional (num_classes=None), so it has no null label")
        return self.num_classes

    def _check_inputs(self, x: Tensor, t: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}); got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},); got {tuple(t.shape)}")

    def _labels(self, y: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
        """Class labels (B,) long, the null label where ``y`` is None; ValueError on a bad ``y``."""
        assert self.num_classes is not None
        if y is None:
            return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        if y.shape != (batch_size,):
            raise ValueError(f"y must have shape (B,) = ({batch_size},); got {tuple(y.shape)}")
        # a range check reads the values back (a device sync); skipped inside torch.compile graphs
        if not torch.compiler.is_compiling() and bool(((y < 0) | (y > self.num_classes)).any()):
            raise ValueError(
                f"y must hold class labels in [0, {self.num_classes}] ({self.num_classes}: null label); "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
        return y

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from a noisy batch.

        Args:
            x: (B, in_channels, image_size, image_size) noisy images ``x_t``.
            t: (B,) integer or float timesteps, fed to the sinusoidal embedding as they are.
            y: (B,) long class labels in ``[0, num_classes]`` (``num_classes`` = null label) for a conditional
                network; ``None`` means the null label for all. Must be ``None`` for an unconditional network.

        Returns:
            (B, out_channels, image_size, image_size).
        """
        self._check_inputs(x, t)
        emb = self.time_embed(t)  # (B, E)
        if self.class_embed is not None:
            emb = emb + self.class_embed(self._labels(y, x.shape[0], x.device))  # (B, E)
        elif y is not None:
            raise ValueError("y was given but this UNet is unconditional; build it with num_classes to use labels")
        emb = F.silu(emb)  # the nonlinearity every ResBlock applies to the embedding, done once

        h = self.conv_in(x)  # (B, base, H, W)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)  # (B, C_last, H / 2^(levels-1), W / 2^(levels-1))
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)

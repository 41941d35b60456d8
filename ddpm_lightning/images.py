"""Image conversions and pictures, written once: [-1, 1] <-> uint8, sample grids, denoising-trajectory strips.

The model works in [-1, 1] (the DDPM paper's data scaling, Ho et al. 2020 sec. 3.3); files, feature extractors and
the web page want uint8 in [0, 255]. Grids have white 2-pixel gutters; a trajectory strip has one row per image,
noise on the left and the sample on the right.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

GUTTER = 2  # pixels between the images of a grid


def to_model_range(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """(N, C, H, W) in [-1, 1] or uint8 -> one (3, H', W') uint8 grid, ``nrow`` images per row (default:
    about square), white gutters."""
    if images.dtype != torch.uint8:
        images = to_uint8(images.float())
    nrow = nrow or max(1, math.isqrt(images.shape[0]))
    return make_grid(images.cpu(), nrow=nrow, padding=GUTTER, pad_value=255)


def to_hwc(image: Tensor) -> np.ndarray:
    """(C, H, W) uint8 (or [-1, 1] float) -> (H, W) for one channel, (H, W, C) otherwise, as numpy uint8."""
    if image.dtype != torch.uint8:
        image = to_uint8(image.float())
    pixels = image.cpu().permute(1, 2, 0).numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write one (C, H, W) image (uint8 or [-1, 1]) or a grid from :func:`grid` as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_hwc(image)).save(path)
    return path


def trajectory_strip(trajectory: Tensor, num_images: int, num_frames: int) -> Tensor:
    """Pick ``num_frames`` evenly spaced steps of the first ``num_images`` trajectories.

    trajectory: (S + 1, N, C, H, W) from x_T to x_0. Returns (num_images * num_frames, C, H, W), row-major: one row
    per image, noise on the left, the sample on the right.
    """
    steps = trajectory.shape[0]
    idx = torch.linspace(0, steps - 1, min(num_frames, steps)).round().long()
    frames = trajectory[idx, :num_images]  # (F, n, C, H, W)
    return frames.transpose(0, 1).reshape(-1, *trajectory.shape[2:])


def trajectory_grid(trajectory: Tensor, num_images: int, num_frames: int) -> Tensor:
    """The strip of :func:`trajectory_strip` laid out as a (3, H', W') uint8 grid, one row per image."""
    k = min(num_images, trajectory.shape[1])
    strip = trajectory_strip(trajectory.float().cpu(), k, num_frames)
    return grid(strip, nrow=strip.shape[0] // k)

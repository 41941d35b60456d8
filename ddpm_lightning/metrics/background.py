"""Background noise: how much grey a model leaves where real images are black.

Speckle on the background of generated digits shows up here long before FID sees it: the score is the mean intensity,
in [0, 1], of generated pixels at the positions that are black (< :data:`BLACK_LEVEL`) in at least
:data:`BLACK_FRACTION` of the real reference images. Real MNIST test digits score about 0.0001 on their own mask.
Datasets with no such positions (most natural images) have an empty mask, and the score is NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: a pixel in [0, 1] below this counts as black
BLACK_LEVEL = 0.05
#: a position is background when it is black in at least this fraction of the real images
BLACK_FRACTION = 0.999


def background_mask(real: Tensor, level: float = BLACK_LEVEL, fraction: float = BLACK_FRACTION) -> Tensor:
    """(C, H, W) bool: the positions black (< ``level``) in at least ``fraction`` of ``real`` (N, C, H, W) uint8."""
    if real.dtype != torch.uint8 or real.ndim != 4 or real.shape[0] == 0:
        raise ValueError(f"real images must be a non-empty (N, C, H, W) uint8 tensor, got {tuple(real.shape)}")
    black = real.float().div(255.0) < level  # (N, C, H, W)
    return black.float().mean(0) >= fraction


def background_noise(images: Tensor, mask: Tensor) -> float:
    """Mean intensity in [0, 1] of ``images`` (N, C, H, W) uint8 at the positions of ``mask`` (C, H, W); NaN when
    the mask is empty."""
    if images.shape[1:] != mask.shape:
        raise ValueError(f"images {tuple(images.shape[1:])} and mask {tuple(mask.shape)} differ in shape")
    if not bool(mask.any()):
        return math.nan
    return float(images.float().div(255.0)[:, mask].mean())

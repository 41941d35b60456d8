"""Per-sample decoding for datasets of photos of varying size: file -> square uint8 (C, size, size) tensor.

Batches can only be collated from equal-sized images, so the datasets whose photos vary in size
(FGVC-Aircraft, Flowers102, any image folder) decode each file straight to the configured square size; the
base DataModule's batch-wise device resize is then a no-op. Everything that can go wrong while reading a file
surfaces as one :class:`UnreadableImageError` that names the file, never as a bare PIL traceback.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

#: PIL modes of the channel counts a DataModule can be configured with
CHANNEL_MODES = {1: "L", 3: "RGB"}

#: integer PIL modes of 16-bit grayscale PNGs, scaled to 8 bits
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")

#: JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, PIL's ``draft``) down to no less than this
#: multiple of the target size, then resized with PIL's antialiased bicubic filter: a 1024x768 photo loads
#: about 2x faster for a 64x64 target, and the final downsampling is still done by a proper filter.
DRAFT_OVERSAMPLING = 2


class UnreadableImageError(ValueError):
    """An image file cannot be opened or decoded (missing, truncated, not an image, ...); names the file."""

    def __init__(self, path: str | Path, reason: BaseException | str, hint: str = "") -> None:
        if isinstance(reason, BaseException):
            text = str(reason).strip().splitlines()[0] if str(reason).strip() else ""
            reason = f"{type(reason).__name__}: {text}" if text else type(reason).__name__
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path} ({reason}){'; ' + hint if hint else ''}")


class SquareImageLoader:
    """Load an image file as a square uint8 tensor ``(channels, size, size)``: the loader torchvision calls.

    Steps: decode (JPEGs at a reduced scale, see :data:`DRAFT_OVERSAMPLING`); drop the bottom ``crop_bottom``
    rows of the stored pixels (FGVC-Aircraft's copyright banner); apply the EXIF orientation; flatten
    transparency onto white; convert to grayscale or RGB; center-crop the largest square; resize it with
    bicubic filtering (as the ADM data pipeline, Dhariwal & Nichol 2021; smaller images are upsampled).

    Args:
        size: side length of the output.
        channels: 1 (grayscale) or 3 (RGB).
        crop_bottom: rows to remove from the bottom, in full-resolution pixels.
    """

    def __init__(self, size: int, channels: Literal[1, 3] = 3, crop_bottom: int = 0) -> None:
        if channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of: {', '.join(map(str, CHANNEL_MODES))}; got {channels!r}")
        if size < 1 or crop_bottom < 0:
            raise ValueError(f"need size >= 1 and crop_bottom >= 0; got {size}, {crop_bottom}")
        self.size = size
        self.mode = CHANNEL_MODES[channels]
        self.crop_bottom = crop_bottom

    def __call__(self, path: str | Path) -> Tensor:
        try:
            with Image.open(path) as img:
                return pil_to_tensor(self._square(img))  # (C, size, size) uint8
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise UnreadableImageError(path, err) from None

    def _square(self, img: Image.Image) -> Image.Image:
        full_height = img.height
        if img.format == "JPEG":
            target = self.size * DRAFT_OVERSAMPLING
            img.draft(self.mode, (target, target))  # may shrink by 1/2, 1/4 or 1/8; never below target
        if self.crop_bottom:  # rows of the stored pixels (before EXIF rotation), scaled to the drafted size
            rows = math.ceil(self.crop_bottom * img.height / full_height)
            if rows >= img.height:
                raise ValueError(f"image is {full_height} px tall, no taller than the {self.crop_bottom} px crop")
            img = img.crop((0, 0, img.width, img.height - rows))
        img = self._to_mode(ImageOps.exif_transpose(img))
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        square = img.crop((left, top, left + side, top + side))  # first: resize(box=) would filter across it
        return square.resize((self.size, self.size), Image.Resampling.BICUBIC)

    def _to_mode(self, img: Image.Image) -> Image.Image:
        if img.mode in _WIDE_INT_MODES:
            img = img.point(lambda v: v / 256)  # 16 -> 8 bits (``convert`` would clip at 255 instead)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        return img.convert(self.mode)

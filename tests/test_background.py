"""Background noise (ddpm_lightning.metrics.background): the grey a model leaves where real images are black."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_lightning.metrics.background import background_mask, background_noise


def test_mask_and_score_on_constructed_images() -> None:
    real = torch.zeros(1000, 1, 4, 4, dtype=torch.uint8)
    real[:, :, 1:3, 1:3] = 255  # a bright centre in every image
    real[0, 0, 0, 0] = 255  # one image of 1,000 bright in a corner: 99.9 % black there, still background
    real[:2, 0, 3, 3] = 255  # two of 1,000 bright here: 99.8 %, not background
    mask = background_mask(real)
    expected = torch.ones(1, 4, 4, dtype=torch.bool)
    expected[:, 1:3, 1:3] = False
    expected[0, 3, 3] = False
    assert torch.equal(mask, expected)
    fake = torch.full((5, 1, 4, 4), 51, dtype=torch.uint8)  # 51 / 255 = 0.2 everywhere
    fake[:, :, 1:3, 1:3] = 255  # the centre does not count
    assert background_noise(fake, mask) == pytest.approx(0.2)
    assert math.isnan(background_noise(fake, torch.zeros_like(mask)))  # no background: NaN, not 0


def test_real_mnist_digits_are_clean_on_their_own_mask(shared_data) -> None:
    """Real test digits score ~0.0001 (issue 18); noise of sd 0.1 clipped to [0, 1] adds its mean (0.04)."""
    from ddpm_lightning.data import MNISTDataModule

    dm = MNISTDataModule(root=str(shared_data), download=False)
    real, _ = dm.real_images("test")
    mask = background_mask(real)
    assert 100 < int(mask.sum()) < 784  # the border of the 28 x 28 digits, not the strokes
    assert background_noise(real, mask) < 0.0005
    noisy = (real.float() / 255 + 0.1 * torch.randn(real.shape)).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert background_noise(noisy, mask) == pytest.approx(0.1 / math.sqrt(2 * math.pi), abs=0.003)


def test_bad_shapes_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="uint8"):
        background_mask(torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        background_noise(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.ones(1, 5, 5, dtype=torch.bool))

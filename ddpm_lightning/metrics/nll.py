"""The test-set negative log-likelihood of a diffusion model in bits per dimension (``ddpm test --metrics.nll true``).

The math is :mod:`ddpm_lightning.likelihood`; this file picks the images, the noise and the labels, splits the
images across DDP ranks and reduces the per-image bounds to a mean and its standard error. Image ``i`` is the i-th of
the test split's seeded subset (:meth:`~ddpm_lightning.data.base.ImageDataModule.real_images`), and its T noises are
drawn from the generator of ``(seed, i)``, so the number does not depend on the batch size or the world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ddpm_lightning.diffusion import VarianceType
from ddpm_lightning.likelihood import bits_per_dim, variational_bound
from ddpm_lightning.metrics.evaluate import sample_generator


def image_bits_per_dim(
    model: Any,
    image: Tensor,
    label: int | None,
    generator: torch.Generator,
    variance: VarianceType = "fixed_large",
    batch_size: int = 250,
) -> float:
    """The variational bound of one uint8 image (C, H, W) under ``model`` (a DiffusionModule with the weights to
    score in place), in bits per dimension. A conditional model is scored given the image's own label:
    -log p(x | y), which bounds -log p(x) to within log2(num_classes) / D (0.004 bits/dim on MNIST)."""
    diffusion, device = model.diffusion, model.device
    x_start = image.to(device).double().div(127.5).sub(1.0).float()  # exactly the 256 levels of [-1, 1]
    T = diffusion.num_timesteps
    noise = torch.randn((T, *x_start.shape), generator=generator, device=device)
    y = torch.tensor([label], device=device) if label is not None else None

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        return model.net(x_t, t, y.expand(x_t.shape[0]) if y is not None else None)

    terms, prior = variational_bound(denoise, diffusion, x_start, noise, variance, batch_size=batch_size)
    return float(bits_per_dim(terms, prior, x_start.numel()))


def dataset_nll(
    model: Any,
    datamodule: Any,
    num_images: int,
    seed: int = 0,
    variance: VarianceType = "fixed_large",
    batch_size: int = 250,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Mean bound over ``num_images`` test images in bits/dim, its standard error (std / sqrt(N)) and N.

    Rank r scores images r, r + world, ...; ``gather`` maps a (per_rank,) tensor to (world, per_rank) as in
    :class:`~ddpm_lightning.metrics.evaluator.Evaluator`.
    """
    from ddpm_lightning.metrics.evaluator import in_index_order

    images, labels = datamodule.real_images("test", num_images, seed=seed)
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"nll_num_images must be >= 2 (a standard error needs two images), got {n}")
    local = []
    with model._eval_mode():
        for i in range(rank, n, world):
            label = int(labels[i]) if model.conditional else None
            gen = sample_generator(seed, i, model.device)
            local.append(image_bits_per_dim(model, images[i], label, gen, variance, batch_size))
    bpd = in_index_order(torch.tensor(local, dtype=torch.float64), n, world, gather)
    return {
        "nll_bpd": float(bpd.mean()),
        "nll_bpd_stderr": float(bpd.std() / math.sqrt(n)),
        "nll_num_images": float(n),
    }

"""ddpm-lightning: denoising diffusion probabilistic models (Ho et al. 2020) with PyTorch Lightning."""

__version__ = "0.1.0"

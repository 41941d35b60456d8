"""Networks: the DDPM U-Net (Ho et al. 2020) and its layers."""

from ddpm_lightning.nn.unet import UNet

__all__ = ["UNet"]

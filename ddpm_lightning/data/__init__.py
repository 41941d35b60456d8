"""DataModules: one per dataset, on a shared base (range [-1, 1], channels/size/classes exposed)."""

from ddpm_lightning.data.base import DatasetNotFoundError, ImageDataModule
from ddpm_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = ["DatasetNotFoundError", "FashionMNISTDataModule", "ImageDataModule", "MNISTDataModule"]

"""DataModules: one per dataset, on a shared base (range [-1, 1], channels/size/classes exposed)."""

from ddpm_lightning.data.aircraft import FGVCAircraftDataModule
from ddpm_lightning.data.base import DatasetNotFoundError, ImageDataModule
from ddpm_lightning.data.cifar import CIFAR10DataModule
from ddpm_lightning.data.flowers import Flowers102DataModule
from ddpm_lightning.data.folder import ImageFolderDataModule
from ddpm_lightning.data.hf import HFDataModule  # needs the [hf] extra only when it opens a dataset
from ddpm_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule
from ddpm_lightning.data.transforms import UnreadableImageError

__all__ = [
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "FGVCAircraftDataModule",
    "FashionMNISTDataModule",
    "Flowers102DataModule",
    "HFDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "UnreadableImageError",
]

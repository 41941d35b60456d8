"""Shared base of every DataModule: scaling to [-1, 1], seeded train/val split, loaders, derived sizes.

Every DataModule exposes ``channels``, ``image_size`` and ``num_classes``; the CLI links them into the model
(``link_arguments(..., apply_on="instantiate")``), so they are never typed twice in a config.

Batches are ``(images, labels)`` with images ``uint8`` ``(B, C, H, W)`` on the host; the conversion to float in
[-1, 1], the optional resize and the random horizontal flip run batch-wise on the training device in
:meth:`ImageDataModule.on_after_batch_transfer`, so a small dataset never pays per-sample Python transforms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing on disk and could not be downloaded; the message says where to put the files."""


def to_model_range(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1] (the DDPM paper's data scaling, Ho et al. 2020 sec. 3.3)."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageDataModule(LightningDataModule):
    """Base DataModule. Subclasses implement :meth:`_download`, :meth:`_load` and the native size properties.

    Args:
        root: folder holding the dataset (torchvision's layout).
        download: fetch the dataset into ``root`` when it is missing (needs internet; ``prepare_data`` runs it on
            one process only).
        batch_size: images per training step on each device.
        num_workers: DataLoader worker processes.
        val_size: images held out of the training split for validation: an int count or a fraction in (0, 1).
        split_seed: seed of the train/val split (independent of the training seed, so the split never moves).
        image_size: resize images to this square size (``None`` keeps the native size).
        hflip: random horizontal flips during training (wrong for digits, right for natural images).
        pin_memory: pin host memory for faster host-to-GPU copies.
    """

    native_channels: int = 0
    native_size: int = 0
    native_num_classes: int = 0

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        image_size: int | None = None,
        hflip: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must be in (0, 1), got {val_size}")
        if isinstance(val_size, int) and val_size < 1:
            raise ValueError(f"val_size as a count must be >= 1, got {val_size}")
        if image_size is not None and image_size < 4:
            raise ValueError(f"image_size must be >= 4 pixels, got {image_size}")
        self.root = root
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = split_seed
        self._image_size = image_size
        self.hflip = hflip
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- sizes the model is linked to --------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Image channels (1 grayscale, 3 RGB)."""
        return self.native_channels

    @property
    def image_size(self) -> int:
        """Side length of the (square) images the model sees."""
        return self._image_size or self.native_size

    @property
    def num_classes(self) -> int:
        """Number of class labels (0 when the data has none)."""
        return self.native_num_classes

    # -- subclass hooks ----------------------------------------------------------------------------------------
    def _download(self) -> None:
        """Fetch the dataset into ``self.root`` (called by ``prepare_data`` on one process)."""
        raise NotImplementedError

    def _load(self, train: bool) -> Dataset:
        """The official train or test split, yielding ``(uint8 (C, H, W) tensor, int label)``."""
        raise NotImplementedError

    def _missing_message(self) -> str:
        """One line saying which files go where when the dataset is missing."""
        return f"dataset not found under {self.root!r}"

    # -- LightningDataModule -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            self._download()
        except DatasetNotFoundError:
            raise
        except Exception as err:  # network errors come in many types (URLError, RuntimeError, OSError...)
            raise DatasetNotFoundError(
                f"download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                f"{self._missing_message()}"
            ) from None

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_set is None:
            full = self._load(train=True)
            n_val = self.val_size if isinstance(self.val_size, int) else round(self.val_size * len(full))
            if not 0 < n_val < len(full):
                raise ValueError(f"val_size={self.val_size} leaves no training or no validation images")
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
            self.val_set = Subset(full, perm[:n_val])
            self.train_set = Subset(full, perm[n_val:])
        if stage in ("test", None) and self.test_set is None:
            self.test_set = self._load(train=False)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("setup() has not built this split yet")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """uint8 -> [-1, 1], resize, and random flips (training only), batch-wise on the step's device."""
        images, labels = batch  # (B, C, H, W) uint8, (B,) int64
        images = to_model_range(images)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        if self.hflip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5  # (B,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, labels

"""Shared base of every DataModule: scaling to [-1, 1], seeded train/val split, loaders, derived sizes.

Every DataModule exposes ``channels``, ``image_size`` and ``num_classes``; the CLI links them into the model
(``link_arguments(..., apply_on="instantiate")``), so they are never typed twice in a config.

Batches are ``(images, labels)`` with images ``uint8`` ``(B, C, H, W)`` on the host; the conversion to float in
[-1, 1], the optional resize and the random horizontal flip run batch-wise on the training device in
:meth:`ImageDataModule.on_after_batch_transfer`, so a small dataset never pays per-sample Python transforms.

The training order is a seeded permutation per epoch (the seed of ``seed_everything``), sharded over the ranks, and
the training loader's position goes into every checkpoint: a run resumed mid-epoch sees exactly the batches the
uninterrupted run would have seen (:class:`ResumableLoader`). No loader draws from the global torch generator, so
the draws of the training step do not depend on when loaders were created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ddpm_lightning.images import to_model_range, to_uint8

SPLITS = ("train", "test")  # the official splits every dataset has (a folder's "test" is its held-out images)


class EpochShuffleSampler(DistributedSampler):
    """This rank's shard of a permutation seeded by (seed, epoch), able to start mid-epoch.

    The sampler Lightning injects under DDP, used on one device too, so the order never depends on the global
    generator. ``skip`` samples of the current epoch are left out of the next ``__iter__`` (a resumed position).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0  # a resumed position belongs to its own epoch only
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        return iter(indices)


class ResumableLoader(DataLoader):
    """Training loader whose position (epoch, batches consumed) Lightning saves in its checkpoints.

    Lightning 2.x stores ``state_dict()`` of each training loader that has one (``loops/fit_loop.py``) and, when it
    resumes mid-epoch, calls ``load_state_dict()`` before iterating again; the sampler then skips the consumed
    batches without loading them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        skip = getattr(self.sampler, "skip", 0)
        self._batches_done = skip // self.batch_size if self.batch_size else 0
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochShuffleSampler) and self.batch_size:
            self.sampler.set_epoch(state["epoch"])
            self.sampler.skip = state["batches_done"] * self.batch_size


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing on disk and could not be downloaded; the message says where to put the files."""


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
            generator=torch.Generator().manual_seed(0),  # iter() draws worker seeds: keep it off the global generator
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("setup() has not built this split yet")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything, as for Lightning's own sampler
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(self.train_set, num_replicas=world, rank=rank, seed=seed),
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),  # worker seeds, off the global generator
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    # -- real images, as the model sees them ----------------------------------------------------------------------
    def to_model_input(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H', W') -> float in [-1, 1] at ``image_size`` (bilinear, antialiased), on images' device."""
        images = to_model_range(images)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return images

    def reference_key(self, split: str) -> dict[str, Any]:
        """What identifies the real images of ``split`` beyond the class, size and channels, for the cache of
        reference statistics (a dataset that can change under the same class adds its fingerprint here)."""
        return {}

    def real_images(self, split: str, num: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``num`` images (all when None; a subset seeded by ``seed`` otherwise) of the official ``train`` or
        ``test`` split as uint8 (n, C, image_size, image_size), processed as the model sees them, and their labels."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        dataset = self._load(train=split == "train")
        n = len(dataset) if num is None else min(num, len(dataset))
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        items = [dataset[i] for i in idx]
        images = torch.stack([image for image, _ in items])  # (n, C, H', W') uint8
        labels = torch.as_tensor([int(label) for _, label in items], dtype=torch.long)
        return to_uint8(self.to_model_input(images)), labels

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """uint8 -> [-1, 1], resize, and random flips (training only), batch-wise on the step's device."""
        images, labels = batch  # (B, C, H, W) uint8, (B,) int64
        images = self.to_model_input(images)
        if self.hflip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5  # (B,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, labels

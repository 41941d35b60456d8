"""CIFAR-10 (32x32 RGB, 10 classes) over torchvision, held in memory as uint8 tensors (180 MB)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from ddpm_lightning.data.base import DatasetNotFoundError, ImageDataModule


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (Krizhevsky 2009): 50,000 train + 10,000 test images in 10 classes; the DDPM benchmark.

    The official train split is what the base splits into train/val (``val_size``); the test split is the test
    set. torchvision checks every file's md5, so a truncated download is reported, not silently trained on.
    The DDPM paper trains with random horizontal flips (``hflip: true``).
    """

    native_channels = 3
    native_size = 32
    native_num_classes = 10
    dataset_cls: type[datasets.CIFAR10] = datasets.CIFAR10

    def _download(self) -> None:
        # one archive holds both splits; the test split is the cheaper one to load after extracting it
        self.dataset_cls(self.root, train=False, download=True)

    def _missing_message(self) -> str:
        cls = self.dataset_cls
        return (
            f"CIFAR-10 not found under {self.root!r}: put {self.root}/{cls.base_folder}/"
            "{data_batch_1..5,test_batch,batches.meta} there (extract "
            f"{cls.filename} from {cls.url} into {self.root}/), or run with --data.download true on a "
            "machine with internet"
        )

    def _bad_file(self) -> tuple[str, bool] | None:
        """The first file missing ``(path, False)`` or failing its md5 ``(path, True)``; None if all pass."""
        cls = self.dataset_cls
        for name, md5 in [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]:
            path = os.path.join(self.root, cls.base_folder, name)
            if not os.path.isfile(path):
                return path, False
            if not check_integrity(path, md5):
                return path, True
        return None

    def _load(self, train: bool) -> Dataset:
        try:
            ds = self.dataset_cls(self.root, train=train, download=False)
        except RuntimeError as err:
            if "not found or corrupted" not in str(err):
                raise
            bad = self._bad_file()
            if bad is not None and bad[1]:
                raise DatasetNotFoundError(
                    f"{bad[0]} is corrupted (md5 mismatch): delete it and download again"
                ) from None
            raise DatasetNotFoundError(self._missing_message()) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        return TensorDataset(images, torch.tensor(ds.targets, dtype=torch.long))

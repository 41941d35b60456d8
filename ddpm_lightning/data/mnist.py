"""MNIST and Fashion-MNIST (28x28 grayscale, 10 classes) over torchvision, held in memory as uint8 tensors."""

from __future__ import annotations

from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets

from ddpm_lightning.data.base import DatasetNotFoundError, ImageDataModule


class _TorchvisionIdxDataModule(ImageDataModule):
    """MNIST-style datasets: 60k/10k idx files that torchvision reads; 47 MB as uint8, so kept in memory."""

    native_channels = 1
    native_size = 28
    native_num_classes = 10
    dataset_cls: type[datasets.MNIST] = datasets.MNIST

    def _download(self) -> None:
        for train in (True, False):
            self.dataset_cls(self.root, train=train, download=True)

    def _missing_message(self) -> str:
        name = self.dataset_cls.__name__
        files = ", ".join(f for f, _ in self.dataset_cls.resources)
        return (
            f"{name} not found under {self.root!r}: put its idx files ({files}, or uncompressed) in "
            f"{self.root}/{name}/raw/, or run with --data.download true on a machine with internet"
        )

    def _load(self, train: bool) -> Dataset:
        try:
            ds = self.dataset_cls(self.root, train=train, download=False)
        except RuntimeError as err:
            if "not found" in str(err).lower():
                raise DatasetNotFoundError(self._missing_message()) from None
            raise
        return TensorDataset(ds.data.unsqueeze(1).contiguous(), ds.targets.long())  # (N, 1, 28, 28) uint8, (N,)


class MNISTDataModule(_TorchvisionIdxDataModule):
    """MNIST handwritten digits (LeCun et al. 1998): 60,000 train + 10,000 test, labels 0-9."""

    dataset_cls = datasets.MNIST


class FashionMNISTDataModule(_TorchvisionIdxDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train + 10,000 test Zalando article images, 10 classes."""

    dataset_cls = datasets.FashionMNIST

"""Oxford Flowers102 (8,189 photos, 102 classes) over torchvision, decoded per sample to a square."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from ddpm_lightning.data.base import DatasetNotFoundError, ImageDataModule
from ddpm_lightning.data.transforms import SquareImageLoader

BASE_FOLDER = "flowers-102"  # torchvision's Flowers102 folder under root


class Flowers102DataModule(ImageDataModule):
    """Oxford 102 Flowers (Nilsback & Zisserman 2008): 1,020 train + 1,020 val + 6,149 test photos.

    The official train split has only 10 images per class, so training uses train + val (2,040 images), which
    the base splits again into train/val (``val_size``); the official test split is the test set. The photos
    vary in size (500 px on the shorter side or more), so each is decoded per sample by
    :class:`~ddpm_lightning.data.transforms.SquareImageLoader`: the largest centered square, resized to
    ``image_size``. Reading the label files needs scipy.

    Args:
        image_size: side length of the images the model sees; required (report 001 trains at 128).
        root, download, batch_size, num_workers, val_size, split_seed, hflip, pin_memory: see
            :class:`~ddpm_lightning.data.base.ImageDataModule`.
    """

    native_channels = 3
    native_num_classes = 102

    def __init__(self, image_size: int | None = None, **kwargs: Any) -> None:
        if image_size is None:
            raise ValueError(
                "Flowers102DataModule needs image_size (its photos vary in size; report 001 uses 128): "
                "set --data.image_size"
            )
        # the base's arguments (root, batch_size, ...) come through **kwargs: jsonargparse follows the call below
        # to the base's signature, so the CLI still lists and type-checks each of them under data.init_args
        super().__init__(image_size=image_size, **kwargs)

    def _download(self) -> None:
        datasets.Flowers102(self.root, split="test", download=True)

    def _missing_message(self) -> str:
        files = datasets.Flowers102._file_dict
        return (
            f"Flowers102 not found under {self.root!r}: it needs {self.root}/{BASE_FOLDER}/jpg/image_*.jpg "
            f"(extract {files['image'][0]}), {self.root}/{BASE_FOLDER}/{files['label'][0]} and "
            f"{self.root}/{BASE_FOLDER}/{files['setid'][0]} (from "
            f"{datasets.Flowers102._download_url_prefix}), or run with --data.download true on a machine "
            "with internet"
        )

    def _split(self, split: str, loader: SquareImageLoader) -> Dataset:
        try:
            return datasets.Flowers102(self.root, split=split, loader=loader)
        except RuntimeError as err:
            if "not found or corrupted" not in str(err):
                raise
            for name, md5 in (datasets.Flowers102._file_dict[key] for key in ("label", "setid")):
                path = Path(self.root, BASE_FOLDER, name)
                if path.is_file() and not check_integrity(str(path), md5):
                    msg = f"{path} is corrupted (md5 mismatch): delete it and download again"
                    raise DatasetNotFoundError(msg) from None
            raise DatasetNotFoundError(self._missing_message()) from None
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(f"Flowers102 reads its .mat label files with scipy: {err}") from None

    def _load(self, train: bool) -> Dataset:
        loader = SquareImageLoader(self.image_size, channels=3)
        if train:
            return ConcatDataset([self._split("train", loader), self._split("val", loader)])
        return self._split("test", loader)

"""FGVC-Aircraft (10,000 photos of aircraft, 100 variants) over torchvision, decoded per sample to squares."""

from __future__ import annotations

from typing import Any, Literal, get_args

from torch.utils.data import Dataset
from torchvision import datasets

from ddpm_lightning.data.base import DatasetNotFoundError, ImageDataModule
from ddpm_lightning.data.transforms import SquareImageLoader

AnnotationLevel = Literal["variant", "family", "manufacturer"]

#: classes per annotation level (the dataset's README: 100 variants, 70 families, 30 manufacturers)
NUM_CLASSES = {"variant": 100, "family": 70, "manufacturer": 30}

#: the file listing each level's class names, one per line (torchvision reads the same)
CLASS_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}

#: every FGVC-Aircraft image carries a copyright banner this many pixels high at its bottom (dataset README)
BANNER_HEIGHT = 20

ARCHIVE_FOLDER = "fgvc-aircraft-2013b"


class FGVCAircraftDataModule(ImageDataModule):
    """FGVC-Aircraft (Maji et al. 2013): 6,667 trainval + 3,333 test photos of 100 aircraft variants.

    The official ``trainval`` split is what the base splits into train/val (``val_size``); ``test`` is the
    test set. The photos vary in size (mostly landscape), so each is decoded per sample by
    :class:`~ddpm_lightning.data.transforms.SquareImageLoader`: the 20-pixel copyright banner at the bottom is
    always cropped off (a generative model would otherwise learn to draw it), then the largest centered square
    is resized to ``image_size``.

    Args:
        image_size: side length of the images the model sees; required (report 001 trains at 64).
        annotation_level: labels exposed for conditional training: ``variant`` (100), ``family`` (70) or
            ``manufacturer`` (30 classes).
        root, download, batch_size, num_workers, val_size, split_seed, hflip, pin_memory: see
            :class:`~ddpm_lightning.data.base.ImageDataModule`.
    """

    native_channels = 3

    def __init__(
        self, image_size: int | None = None, annotation_level: AnnotationLevel = "variant", **kwargs: Any
    ) -> None:
        if image_size is None:
            raise ValueError(
                "FGVCAircraftDataModule needs image_size (its photos vary in size; report 001 uses 64): "
                "set --data.image_size"
            )
        if annotation_level not in NUM_CLASSES:
            choices = ", ".join(get_args(AnnotationLevel))
            raise ValueError(f"unknown annotation_level {annotation_level!r}; choose one of: {choices}")
        # the base's arguments (root, batch_size, ...) come through **kwargs: jsonargparse follows the call below
        # to the base's signature, so the CLI still lists and type-checks each of them under data.init_args
        super().__init__(image_size=image_size, **kwargs)
        self.annotation_level = annotation_level

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.annotation_level]

    def _download(self) -> None:
        datasets.FGVCAircraft(self.root, split="test", annotation_level=self.annotation_level, download=True)

    def _missing_message(self) -> str:
        data = f"{self.root}/{ARCHIVE_FOLDER}/data"
        level = self.annotation_level
        return (
            f"FGVC-Aircraft not found under {self.root!r}: it needs {data}/images/*.jpg, "
            f"{data}/{CLASS_FILES[level]} and {data}/images_{level}_{{trainval,test}}.txt (extract "
            f"{ARCHIVE_FOLDER}.tar.gz from {datasets.FGVCAircraft._URL} into {self.root}/), or run with "
            "--data.download true on a machine with internet"
        )

    def _load(self, train: bool) -> Dataset:
        loader = SquareImageLoader(self.image_size, channels=3, crop_bottom=BANNER_HEIGHT)
        split = "trainval" if train else "test"
        try:
            ds = datasets.FGVCAircraft(self.root, split=split, annotation_level=self.annotation_level, loader=loader)
        except (RuntimeError, FileNotFoundError) as err:
            if isinstance(err, RuntimeError) and "not found" not in str(err).lower():
                raise
            raise DatasetNotFoundError(self._missing_message()) from None
        if len(ds.classes) != self.num_classes:
            raise ValueError(
                f"{self.root}/{ARCHIVE_FOLDER} lists {len(ds.classes)} {self.annotation_level} classes, "
                f"expected {self.num_classes}"
            )
        return ds

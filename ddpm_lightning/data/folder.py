"""Any folder of PNG/JPEG images, optionally with one subfolder per class, decoded per sample to a square."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ddpm_lightning.data.base import DatasetNotFoundError, ImageDataModule
from ddpm_lightning.data.transforms import CHANNEL_MODES, SquareImageLoader, UnreadableImageError

OnCorrupt = Literal["error", "skip"]

#: file name endings read as images (case-insensitive); everything else in the folder is ignored
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

#: files per batch of the up-front readability scan
_SCAN_BATCH = 32


def _images_under(folder: Path) -> list[str]:
    """Sorted paths of the image files under ``folder``, recursively, skipping hidden files and folders."""
    found: list[str] = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune .git, .ipynb_checkpoints, ...
        found += [
            os.path.join(dirpath, n) for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


class ImageFiles(Dataset):
    """``(uint8 (C, size, size) tensor, int label)`` per file, decoded by ``loader``."""

    def __init__(self, paths: list[str], labels: list[int], loader: SquareImageLoader) -> None:
        self.paths, self.labels, self.loader = paths, labels, loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.loader(self.paths[index]), self.labels[index]


class _Probe(ImageFiles):
    """Decodes each file once and yields why it failed (``""`` when it did not), for the up-front scan."""

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        try:
            self.loader(self.paths[index])
        except UnreadableImageError as err:
            return err.reason
        return ""


class ImageFolderDataModule(ImageDataModule):
    """Your own images: every PNG/JPEG under ``root``, recursively (hidden files and folders skipped).

    With ``class_subfolders``, each immediate subfolder of ``root`` is a class (labels follow the sorted
    folder names; files directly in ``root`` are ignored); without, every label is 0 and there are no classes.
    Images are converted to grayscale or RGB (transparency flattened onto white, EXIF orientation applied) and
    the largest centered square is resized to ``image_size`` per sample.

    Unreadable files are found up front, in :meth:`setup`, by decoding every file once (in ``num_workers``
    processes): a dataset's length must be fixed before its sampler is built, so a file cannot be dropped
    mid-epoch, and a broken file should stop the run before it spends GPU time, not hours in. The first one
    is reported as an :class:`~ddpm_lightning.data.transforms.UnreadableImageError` naming it; with
    ``on_corrupt="skip"`` they are left out, counted in :attr:`num_skipped`, listed in :attr:`skipped_files`
    and reported once. The cost is one decode per file on each process (large JPEGs decode at reduced scale).

    A folder has no official test split: ``test`` uses the held-out validation images.

    Args:
        root: the folder.
        image_size: side length of the images the model sees; required.
        class_subfolders: immediate subfolders are classes and their images carry class labels.
        channels: 1 (grayscale) or 3 (RGB), whatever the files hold.
        on_corrupt: ``error`` stops at the first unreadable file; ``skip`` leaves them out and counts them.
        batch_size, num_workers, val_size, split_seed, hflip, pin_memory: see
            :class:`~ddpm_lightning.data.base.ImageDataModule`.
    """

    def __init__(
        self,
        root: str,
        image_size: int | None = None,
        class_subfolders: bool = False,
        channels: Literal[1, 3] = 3,
        on_corrupt: OnCorrupt = "error",
        **kwargs: Any,
    ) -> None:
        if image_size is None:
            raise ValueError("ImageFolderDataModule needs image_size (images are resized to it): set --data.image_size")
        if channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of: {', '.join(map(str, CHANNEL_MODES))}; got {channels!r}")
        if on_corrupt not in get_args(OnCorrupt):
            raise ValueError(f"unknown on_corrupt {on_corrupt!r}; choose one of: {', '.join(get_args(OnCorrupt))}")
        # the base's arguments (batch_size, val_size, ...) come through **kwargs: jsonargparse follows the call below
        # to the base's signature, so the CLI still lists and type-checks each of them under data.init_args
        super().__init__(root=root, download=False, image_size=image_size, **kwargs)  # nothing to download
        self.class_subfolders = class_subfolders
        self._channels = channels
        self.on_corrupt = on_corrupt
        self.skipped_files: list[str] = []
        self._classes: list[str] | None = None

    # -- sizes the model is linked to -----------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self._channels

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.class_subfolders else 0

    @property
    def classes(self) -> list[str]:
        """Class names: the sorted immediate subfolders of ``root`` (empty without ``class_subfolders``)."""
        if not self.class_subfolders:
            return []
        if self._classes is None:
            root = self._existing_root()
            self._classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
            if not self._classes:
                raise DatasetNotFoundError(f"class_subfolders is set but {root} has no subfolders")
        return self._classes

    @property
    def num_skipped(self) -> int:
        """Unreadable files left out by ``on_corrupt="skip"``."""
        return len(self.skipped_files)

    # -- files ----------------------------------------------------------------------------------------------
    def _existing_root(self) -> Path:
        root = Path(self.root)
        if not root.is_dir():
            raise DatasetNotFoundError(f"image folder {root} not found (or not a folder)")
        return root

    def _find_files(self) -> tuple[list[str], list[int]]:
        """Image paths, sorted so the seeded split is the same on every machine, and their labels."""
        root = self._existing_root()
        folders = [root / name for name in self.classes] if self.class_subfolders else [root]
        paths: list[str] = []
        labels: list[int] = []
        for label, folder in enumerate(folders):
            found = _images_under(folder)
            if self.class_subfolders and not found:
                raise DatasetNotFoundError(f"class folder {folder} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
            paths += found
            labels += [label] * len(found)
        if not paths:
            raise DatasetNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {root}")
        return paths, labels

    def _scan(self, files: ImageFiles) -> list[str]:
        """Decode every file once; the failure reason per file (``""`` for a readable one)."""
        probe = _Probe(files.paths, files.labels, files.loader)
        batches = DataLoader(probe, batch_size=_SCAN_BATCH, num_workers=self.num_workers, collate_fn=list)
        return [reason for batch in batches for reason in batch]

    # -- the base's hooks -----------------------------------------------------------------------------------
    def _load(self, train: bool) -> Dataset:
        """Every readable image of the folder (one split: ``train`` is ignored, see :meth:`setup`)."""
        paths, labels = self._find_files()
        files = ImageFiles(paths, labels, SquareImageLoader(self.image_size, channels=self._channels))
        reasons = self._scan(files)
        bad = [i for i, reason in enumerate(reasons) if reason]
        if bad and self.on_corrupt == "error":
            hint = f"{len(bad)} of {len(paths)} files unreadable; fix or delete them, or set on_corrupt: skip"
            raise UnreadableImageError(paths[bad[0]], reasons[bad[0]], hint=hint)
        if bad:
            self.skipped_files = [paths[i] for i in bad]
            rank_zero_info(
                f"ImageFolderDataModule: skipped {len(bad)} unreadable of {len(paths)} images in {self.root} "
                f"(first: {paths[bad[0]]}: {reasons[bad[0]]})"
            )
            keep = [i for i, reason in enumerate(reasons) if not reason]
            if not keep:
                raise DatasetNotFoundError(f"none of the {len(paths)} images under {self.root} is readable")
            files = ImageFiles([paths[i] for i in keep], [labels[i] for i in keep], files.loader)
        return files

    def setup(self, stage: str | None = None) -> None:
        super().setup("fit")  # train/val split of the whole folder, built once
        self.test_set = self.val_set

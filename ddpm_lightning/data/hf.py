"""Any image dataset of the Hugging Face ``datasets`` library: a Hub name, local parquet/arrow files or image folders,
or a folder written by ``save_to_disk``; decoded once to squares, then read as uint8 like every other DataModule.

Needs the optional extra ``pip install -e ".[hf]"``; ``datasets`` is imported only when such a DataModule opens its
data, so ``ddpm fit`` on the other DataModules never needs it. Offline (``HF_DATASETS_OFFLINE=1``), a Hub name is read
from the ``datasets`` cache (``cache_dir``) a machine with internet filled; folders and files never need the network
(docs/datasets.md).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.data.hf_splits import HFDatasetError, lazy_datasets, open_dataset, resolve_split
from ddpm_lightning.data.transforms import CHANNEL_MODES, SquareImageLoader, UnreadableImageError

if TYPE_CHECKING:
    import datasets

#: rows per batch of the one-time decode (``Dataset.map``)
_DECODE_BATCH = 64
#: bump when the decode below changes what it writes, so no stale decoded cache is reused
_DECODE_VERSION = 1


class SquareRows(Dataset):
    """``(uint8 (C, S, S) tensor, int label)`` per row of a decoded table (columns ``pixels`` bytes, ``label``)."""

    def __init__(self, table: datasets.Dataset, shape: tuple[int, int, int]) -> None:
        self.table, self.shape = table, shape

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        row = self.table[index]
        return torch.frombuffer(bytearray(row["pixels"]), dtype=torch.uint8).view(self.shape), row["label"]


class HFDataModule(ImageDataModule):
    """Images (and optionally labels) of a Hugging Face dataset.

    ``path`` is a Hub name (``huggan/smithsonian_butterflies_subset``), a folder written by ``save_to_disk``, a
    local dataset folder (parquet/arrow files, or an ``imagefolder`` layout of images with one subfolder per
    class), or parquet/arrow files (a path or a glob). Splits are named as ``datasets`` names them: a split
    (``train``) or a slice of one (``train[:95%]``, ``train[1000:]``). Without ``val_split`` the validation images
    are held out of the training split (``val_size``, ``split_seed``); without ``test_split`` the test images are
    the dataset's ``test`` split when it has one, else the validation images. ``ddpm test`` and the sample metrics
    score against the test images; their cached reference statistics are keyed by the dataset's fingerprint,
    split and size (:meth:`reference_key`).

    Every image is decoded once, in :meth:`prepare_data` (one process per node, ``num_proc`` workers; :meth:`setup`
    elsewhere finds the result in the cache): converted to grayscale or RGB, its largest centered square resized to
    ``image_size`` (as :class:`~ddpm_lightning.data.folder.ImageFolderDataModule` does), and written to an Arrow
    file in the ``datasets`` cache; an unreadable image stops the run there, named.

    Args:
        path: where the dataset is (see above).
        name: the dataset's configuration (Hub datasets with several), or ``None``.
        revision: a Hub branch, tag or commit (pin one for reproducible runs), or ``None`` for the default branch.
        train_split, val_split, test_split: split names or slices (see above).
        image_column: the column of images (default: the first ``Image`` column).
        label_column: a ``ClassLabel`` or integer column: the labels of a class-conditional model (``None``: no
            classes). A ClassLabel gives the class names (:attr:`classes`), an integer column 0..max.
        image_size: side length of the images the model sees; required.
        channels: 1 (grayscale) or 3 (RGB), whatever the images hold.
        cache_dir: the ``datasets`` cache (Hub downloads and the decoded squares); default: its own default.
        num_proc: processes that build the dataset and decode its images (``None``: one).
        batch_size, num_workers, val_size, split_seed, hflip, pin_memory: see
            :class:`~ddpm_lightning.data.base.ImageDataModule`.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        revision: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        image_size: int | None = None,
        channels: Literal[1, 3] = 3,
        cache_dir: str | None = None,
        num_proc: int | None = None,
        **kwargs: Any,
    ) -> None:
        if image_size is None:
            raise ValueError("HFDataModule needs image_size (images are resized to it): set --data.image_size")
        if channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of: {', '.join(map(str, CHANNEL_MODES))}; got {channels!r}")
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"num_proc must be >= 1 or null, got {num_proc}")
        # the base's arguments (batch_size, val_size, ...) come through **kwargs: jsonargparse follows the call below
        # to the base's signature, so the CLI still lists and type-checks each of them under data.init_args
        super().__init__(root=path, download=False, image_size=image_size, **kwargs)  # datasets downloads itself
        self.path, self.name, self.revision = path, name, revision
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.image_column, self.label_column = image_column, label_column
        self._channels = channels
        self.cache_dir, self.num_proc = cache_dir, num_proc
        self._data: datasets.DatasetDict | None = None
        self._decoded: dict[str, SquareRows] = {}
        self._num_classes: int | None = None

    # -- sizes the model is linked to -----------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self._channels

    @property
    def num_classes(self) -> int:
        """Classes of ``label_column`` (0 without one): a ClassLabel's count, or 1 + the largest training label."""
        if self.label_column is None:
            return 0
        if self._num_classes is None:
            feature = self._label_feature()
            if hasattr(feature, "num_classes"):
                self._num_classes = int(feature.num_classes)
            else:  # an integer column: the classes are 0..max of the training split
                labels = self._source(self.train_split)[self.label_column]
                self._num_classes = int(max(labels)) + 1
        return self._num_classes

    @property
    def classes(self) -> list[str]:
        """Class names, one per label (a ClassLabel's names; ``"0"``, ``"1"``, ... for an integer column)."""
        if self.label_column is None:
            return []
        names = getattr(self._label_feature(), "names", None)
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    # -- the dataset ----------------------------------------------------------------------------------------
    @property
    def data(self) -> datasets.DatasetDict:
        """Every split of the dataset (opened, and for a Hub name downloaded into the cache, on first use)."""
        if self._data is None:
            self._data = open_dataset(self.path, self.name, self.revision, self.cache_dir, self.num_proc)
            self._check_columns(self._data)
        return self._data

    def _check_columns(self, data: datasets.DatasetDict) -> None:
        ds = lazy_datasets()
        first = next(iter(data.values()))
        features, columns = first.features, ", ".join(first.column_names)
        images = [c for c, f in features.items() if isinstance(f, ds.Image)]
        if self.image_column is None:
            if not images:
                raise HFDatasetError(f"{self.path} has no Image column (columns: {columns}); set image_column")
            self.image_column = images[0]
        for role, column in (("image_column", self.image_column), ("label_column", self.label_column)):
            if column is not None and column not in features:
                raise HFDatasetError(f"{role} {column!r} is not a column of {self.path}; its columns: {columns}")
        if not isinstance(features[self.image_column], ds.Image):
            kind = _describe(features[self.image_column])
            listed = ", ".join(images) or "none"
            raise HFDatasetError(
                f"image_column {self.image_column!r} of {self.path} holds {kind}, not images (Image columns: {listed})"
            )
        if self.label_column is not None and not _is_integer(features[self.label_column]):
            kind = _describe(features[self.label_column])
            raise HFDatasetError(
                f"label_column {self.label_column!r} of {self.path} holds {kind}, not a ClassLabel or integer column; "
                "leave label_column unset for an unconditional model"
            )

    def _label_feature(self) -> Any:
        return self.data[next(iter(self.data))].features[self.label_column]

    def _source(self, spec: str) -> datasets.Dataset:
        """The rows of split ``spec`` (``train``, ``train[:95%]``, ...), not yet decoded."""
        return resolve_split(self.data, spec, self.path)

    def _decode(self, spec: str) -> SquareRows:
        """Split ``spec`` decoded to square uint8 images (cached in memory here and on disk by ``datasets``)."""
        if spec not in self._decoded:
            self._decoded[spec] = self._decode_split(self._source(spec), spec)
        return self._decoded[spec]

    def _decode_split(self, source: datasets.Dataset, spec: str) -> SquareRows:
        ds = lazy_datasets()
        shape = (self._channels, self.image_size, self.image_size)
        raw = source.cast_column(self.image_column, ds.Image(decode=False))  # {"bytes", "path"}: our loader decodes
        loader = SquareImageLoader(self.image_size, channels=self._channels)
        decode = _SquareDecoder(loader, self.image_column, self.label_column)
        features = ds.Features({"pixels": ds.Value("binary"), "label": ds.Value("int64"), "error": ds.Value("string")})
        settings = [_DECODE_VERSION, source._fingerprint, self.image_column, self.label_column, *shape]
        fingerprint = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
        cache = Path(self.cache_dir or ds.config.HF_DATASETS_CACHE) / "ddpm_lightning_squares"
        cache.mkdir(parents=True, exist_ok=True)
        table = raw.map(
            decode,
            batched=True,
            batch_size=_DECODE_BATCH,
            remove_columns=raw.column_names,
            features=features,
            num_proc=self.num_proc if self.num_proc and self.num_proc > 1 and len(raw) > 1 else None,
            new_fingerprint=fingerprint,
            cache_file_name=str(cache / f"squares-{fingerprint}.arrow"),
            desc=f"decoding {spec} to {self.image_size}px squares",
        )
        errors = table["error"]
        bad = [i for i, e in enumerate(errors) if e]
        if bad:
            hint = f"{len(bad)} of {len(errors)} images of split {spec!r} unreadable; fix or drop those rows"
            raise UnreadableImageError(f"{self.path} [{spec}] row {bad[0]}", errors[bad[0]], hint=hint)
        self._check_labels(table, spec)
        return SquareRows(table.remove_columns("error"), shape)

    def _check_labels(self, table: datasets.Dataset, spec: str) -> None:
        if self.label_column is None:
            return
        labels = torch.as_tensor(list(table["label"]))
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise HFDatasetError(
                f"label_column {self.label_column!r} of split {spec!r} holds {low if low < 0 else high}, outside the "
                f"classes 0..{self.num_classes - 1} (-1 marks unlabelled rows); choose a labelled split"
            )

    # -- the base's hooks -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download (a Hub name) and decode every split in use on one process per node; the other processes then
        find both in the cache (``datasets`` reuses a decode whose cache file exists)."""
        for spec in self._specs():
            self._decode(spec)

    def _specs(self) -> list[str]:
        """The distinct splits in use, each checked (exists, has rows) before any is decoded."""
        specs = [s for s in dict.fromkeys((self.train_split, self.val_split, self._test_spec())) if s is not None]
        for spec in specs:
            self._source(spec)
        return specs

    def _test_spec(self) -> str | None:
        """The split the test images come from; ``None``: the validation images."""
        if self.test_split is not None:
            return self.test_split
        return "test" if "test" in self.data and self.train_split.split("[")[0] != "test" else None

    def _load(self, train: bool) -> Dataset:
        """The training split (``train``, before a held-out validation part is taken) or the test images."""
        if train:
            return self._decode(self.train_split)
        spec = self._test_spec()
        if spec is not None:
            return self._decode(spec)
        self.setup("fit")
        return self.val_set

    def setup(self, stage: str | None = None) -> None:
        self._specs()
        if self.train_set is None and self.val_split is not None:
            self.train_set, self.val_set = self._decode(self.train_split), self._decode(self.val_split)
        super().setup("fit")  # with val_split unset: the seeded hold-out of the training split
        if stage in ("test", None) and self.test_set is None:
            self.test_set = self._load(train=False)

    def reference_key(self, split: str) -> dict[str, Any]:
        """What identifies the real images of ``split`` (``train`` or ``test``) for the reference-statistics cache:
        the dataset's fingerprint (it changes whenever the data does), the split and the number of rows."""
        if split == "train":
            spec = self.train_split
        elif (spec := self._test_spec() or self.val_split) is None:  # validation images held out of the training split
            rows = self._source(self.train_split)
            size = self.val_size if isinstance(self.val_size, int) else round(self.val_size * len(rows))
            held_out = f"{self.train_split} held out: val_size={self.val_size}, split_seed={self.split_seed}"
            return self._key(rows, held_out, size)
        rows = self._source(spec)
        return self._key(rows, spec, len(rows))

    def _key(self, rows: datasets.Dataset, spec: str, size: int) -> dict[str, Any]:
        return {
            "hf_path": self.path,
            "hf_name": self.name,
            "fingerprint": rows._fingerprint,
            "hf_split": spec,
            "rows": size,
            "image_column": self.image_column,
        }


class _SquareDecoder:
    """The batch function of the one-time decode: image bytes or path -> square pixels, label, error reason."""

    def __init__(self, loader: SquareImageLoader, image_column: str, label_column: str | None) -> None:
        self.loader, self.image_column, self.label_column = loader, image_column, label_column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixels, errors = [], []
        for image in batch[self.image_column]:
            try:
                source = io.BytesIO(image["bytes"]) if image["bytes"] is not None else image["path"]
                pixels.append(self.loader(source).numpy().tobytes())
                errors.append("")
            except UnreadableImageError as err:
                pixels.append(b"")
                errors.append(err.reason)
        n = len(pixels)
        labels = batch[self.label_column] if self.label_column is not None else [0] * n
        return {"pixels": pixels, "label": [int(v) if v is not None else -1 for v in labels], "error": errors}


def _is_integer(feature: Any) -> bool:
    ds = lazy_datasets()
    if isinstance(feature, ds.ClassLabel):
        return True
    return isinstance(feature, ds.Value) and feature.dtype.startswith(("int", "uint"))


def _describe(feature: Any) -> str:
    """A feature in words: ``string values``, ``a ClassLabel``, ``a list``, ..."""
    if hasattr(feature, "dtype") and type(feature).__name__ == "Value":
        return f"{feature.dtype} values"
    kind = type(feature).__name__
    return f"{'an' if kind[0] in 'AEIOU' else 'a'} {kind}"

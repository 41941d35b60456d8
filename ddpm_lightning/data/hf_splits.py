"""Opening a Hugging Face dataset wherever it is, and its splits by name or slice, with one-line errors.

``datasets`` is imported here lazily (:func:`lazy_datasets`), never when ``ddpm_lightning.data`` is imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ddpm_lightning.data.base import DatasetNotFoundError

if TYPE_CHECKING:
    import datasets

#: builder of ``datasets`` that reads files by their ending (a ``path`` naming files or a glob of them)
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}

#: a split name, optionally sliced: ``train``, ``train[:95%]``, ``train[1000:]``, ``test[10%:20%]``
_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


class HFDatasetError(ValueError):
    """A Hugging Face dataset cannot be used as configured (a column, a split); the message says what there is."""


def lazy_datasets() -> ModuleType:
    """The ``datasets`` library, or a one-line error saying how to install it."""
    try:
        import datasets
    except ModuleNotFoundError:
        raise HFDatasetError(
            'HFDataModule needs the Hugging Face `datasets` library: pip install -e ".[hf]" (or pip install datasets)'
        ) from None
    return datasets


def _first_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _offline_message(path: str, cache_dir: str | None) -> str:
    cache = cache_dir or "the default datasets cache (~/.cache/huggingface/datasets, or $HF_DATASETS_CACHE)"
    return (
        f"Hugging Face dataset {path!r} is not in {cache} and the Hub cannot be reached (offline: "
        "HF_DATASETS_OFFLINE=1 or no network): download it on a machine with internet, with "
        f"datasets.load_dataset({path!r}, cache_dir=DIR), and copy DIR here as data.cache_dir, or save it with "
        ".save_to_disk(FOLDER) and set data.path to FOLDER"
    )


def _is_saved_folder(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def open_dataset(
    path: str, name: str | None, revision: str | None, cache_dir: str | None, num_proc: int | None
) -> datasets.DatasetDict:
    """Every split of the dataset at ``path``: a ``save_to_disk`` folder, files, a local folder or a Hub name."""
    ds = lazy_datasets()
    local = Path(path).expanduser()
    if _is_saved_folder(local):
        loaded = ds.load_from_disk(str(local))
        return loaded if isinstance(loaded, ds.DatasetDict) else ds.DatasetDict({"train": loaded})
    kwargs = {"cache_dir": cache_dir, "num_proc": num_proc}
    suffix = "".join(local.suffixes[-1:]).lower()
    try:
        if local.is_file() or any(c in path for c in "*?"):
            if suffix not in FILE_BUILDERS:
                raise HFDatasetError(
                    f"cannot read {path}: data files must end in {', '.join(FILE_BUILDERS)} (or give a folder or a "
                    "Hub name)"
                )
            return ds.load_dataset(FILE_BUILDERS[suffix], data_files=os.path.expanduser(path), **kwargs)
        return ds.load_dataset(path, name=name, revision=revision, **kwargs)
    except HFDatasetError:
        raise
    except ConnectionError:
        raise DatasetNotFoundError(_offline_message(path, cache_dir)) from None
    except (FileNotFoundError, ds.exceptions.DatasetNotFoundError) as err:
        raise DatasetNotFoundError(f"cannot open Hugging Face dataset {path!r} ({_first_line(err)})") from None
    except ValueError as err:  # an unknown config, a config missing from an offline cache, ...
        raise HFDatasetError(f"cannot open Hugging Face dataset {path!r} ({_first_line(err)})") from None


def _bound(text: str | None, n: int, default: int) -> int:
    """A slice bound: rows, or a percentage of ``n`` rounded to the closest row (as ``datasets`` rounds)."""
    if text is None:
        return default
    value = round(int(text[:-1]) * n / 100) if text.endswith("%") else int(text)
    return max(0, min(n, value + n if value < 0 else value))


def resolve_split(data: datasets.DatasetDict, spec: str, path: str) -> datasets.Dataset:
    """The rows of ``spec``: a split of ``data`` by name, or a slice of one (``train[:95%]``)."""
    match = _SPLIT.match(spec.strip())
    if match is None:
        raise HFDatasetError(
            f"cannot read split {spec!r}: give a split name or a slice like train[:95%] or train[100:]"
        )
    name = match["name"]
    if name not in data:
        raise HFDatasetError(f"split {name!r} is not in {path}; its splits: {', '.join(data)}")
    rows = data[name]
    if match["start"] is not None or match["stop"] is not None:
        n = len(rows)
        start, stop = _bound(match["start"], n, 0), _bound(match["stop"], n, n)
        rows = rows.select(range(start, stop)) if stop > start else rows.select([])
    if len(rows) == 0:
        raise HFDatasetError(f"split {spec!r} of {path} has no rows")
    return rows

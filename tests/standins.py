"""Tiny stand-ins of CIFAR-10, FGVC-Aircraft and Flowers102 in their real on-disk formats, and image folders.

This machine has no internet and no copy of these datasets, so the tests write a few images in exactly the
layout torchvision reads (file names, pickles, list files, .mat files): torchvision's own parsing code runs.

Checksums: torchvision verifies CIFAR-10's batches and Flowers102's .mat files against the md5s of the real
files, which no stand-in can match. Rather than switch the check off (patching ``check_integrity`` would also
skip its "file exists" test and hide a stand-in that torchvision cannot read), the writers return the md5s of
what they wrote, and :func:`trust_cifar10` / :func:`trust_flowers102` put those in place of the real ones on
the torchvision class (by ``monkeypatch``, undone after each test); torchvision still hashes every file.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import datasets

#: recipes whose data is a stand-in written here (tests/test_cli.py runs the others on the real MNIST files)
STANDIN_CONFIGS = {"cifar10", "aircraft64", "flowers128", "image_folder"}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

#: FGVC-Aircraft's banner height (its README), drawn black at the bottom of every stand-in photo
AIRCRAFT_BANNER = 20


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def label_color(label: int) -> tuple[int, int, int]:
    """A bright RGB color per label (every channel >= 120), far from the black banner; JPEG keeps it."""
    return (120 + (37 * label) % 136, 120 + (71 * label) % 136, 120 + (113 * label) % 136)


def _photo(width: int, height: int, label: int, banner: int = 0) -> Image.Image:
    """A flat photo in the label's color, with a black banner holding a white 'text' stripe at the bottom."""
    pixels = np.empty((height + banner, width, 3), np.uint8)
    pixels[:height] = label_color(label)
    pixels[height:] = 0
    if banner:
        pixels[height + banner // 2 - 2 : height + banner // 2 + 2, 4 : width // 2] = 255
    return Image.fromarray(pixels)


# -- CIFAR-10: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, pickled dicts ----------------
@dataclass
class CIFAR10StandIn:
    root: Path
    train_images: np.ndarray  # (N, 3, 32, 32) uint8, in file order
    train_labels: list[int]
    test_images: np.ndarray
    test_labels: list[int]
    md5s: dict[str, str] = field(default_factory=dict)  # file name -> md5 of the stand-in file


def write_cifar10(root: Path, per_batch: int = 4, num_test: int = 6, seed: int = 0) -> CIFAR10StandIn:
    """Five train batches of ``per_batch`` images and a test batch, as CIFAR-10's Python version stores them.

    Each batch is a pickled dict with ``data`` ((N, 3072) uint8, channel-major rows: 1024 red, 1024 green,
    1024 blue values), ``labels``, ``batch_label`` and ``filenames``; ``batches.meta`` holds ``label_names``.
    """
    folder = root / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (5 * per_batch + num_test, 3, 32, 32), dtype=np.uint8)
    labels = [i % 10 for i in range(len(images))]
    md5s = {}

    def dump(name: str, entry: dict) -> None:
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        md5s[name] = md5(folder / name)

    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        rows = slice(b * per_batch, (b + 1) * per_batch) if b < 5 else slice(5 * per_batch, None)
        dump(
            name,
            {
                "batch_label": f"{name} stand-in",
                "labels": labels[rows],
                "data": images[rows].reshape(-1, 3072),
                "filenames": [f"standin_{i}.png" for i in range(len(labels[rows]))],
            },
        )
    dump("batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072})
    n = 5 * per_batch
    return CIFAR10StandIn(root, images[:n], labels[:n], images[n:], labels[n:], md5s)


def trust_cifar10(monkeypatch: pytest.MonkeyPatch, standin: CIFAR10StandIn) -> None:
    """Make torchvision's CIFAR10 expect the stand-in's md5s (see the module docstring)."""
    cls = datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[name, standin.md5s[name]] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, standin.md5s[name]] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": standin.md5s[cls.meta["filename"]]})


# -- FGVC-Aircraft: fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, images_variant_trainval.txt, ...
#: a few real variant names (with the spaces and slashes the list files hold), the rest numbered
_VARIANTS = ["707-320", "727-200", "A300B4", "Boeing 717", "Cessna 172", "F/A-18", "DHC-1", "Tu-134"]
_VARIANTS += [f"Variant {i:03d}" for i in range(len(_VARIANTS), 100)]
_FAMILIES = [f"Family {i:02d}" for i in range(70)]
_MANUFACTURERS = [f"Maker {i:02d}" for i in range(30)]

#: stand-in photo sizes without the banner (width, height); the last is large enough for JPEG draft decoding
AIRCRAFT_SIZES = [(64, 48), (96, 56), (48, 64), (192, 144)]


@dataclass
class AircraftStandIn:
    root: Path
    splits: dict[str, list[tuple[str, int]]]  # official split -> [(image id, variant index)]

    def labels(self, split: str, level: str = "variant") -> list[int]:
        """Class indices of a split at a level (family = variant % 70, manufacturer = variant % 30)."""
        mod = {"variant": 100, "family": 70, "manufacturer": 30}[level]
        return [variant % mod for _, variant in self.splits[split]]


def write_fgvc_aircraft(root: Path, sizes: dict[str, int] | None = None) -> AircraftStandIn:
    """JPEGs with a 20-pixel banner, the class lists and ``images_{level}_{split}.txt`` for every level/split.

    List files hold one ``<7-digit image id> <class name>`` per line (class names may contain spaces); the
    official splits are train, val, trainval (= train + val) and test.
    """
    sizes = sizes or {"train": 5, "val": 3, "test": 4}
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    names = {"variant": _VARIANTS, "family": _FAMILIES, "manufacturer": _MANUFACTURERS}
    for level, file in (
        ("variant", "variants.txt"),
        ("family", "families.txt"),
        ("manufacturer", "manufacturers.txt"),
    ):
        (data / file).write_text("".join(f"{n}\n" for n in names[level]))
    splits: dict[str, list[tuple[str, int]]] = {}
    index = 0
    for split, count in sizes.items():
        splits[split] = []
        for _ in range(count):
            image_id, variant = f"{1025794 + 7 * index:07d}", (13 * index + 99) % 100  # includes variant 99
            width, height = AIRCRAFT_SIZES[index % len(AIRCRAFT_SIZES)]
            _photo(width, height, variant, AIRCRAFT_BANNER).save(data / "images" / f"{image_id}.jpg", quality=95)
            splits[split].append((image_id, variant))
            index += 1
    splits["trainval"] = splits["train"] + splits["val"]
    for level, mod in (("variant", 100), ("family", 70), ("manufacturer", 30)):
        for split, items in splits.items():
            lines = "".join(f"{image_id} {names[level][v % mod]}\n" for image_id, v in items)
            (data / f"images_{level}_{split}.txt").write_text(lines)
    return AircraftStandIn(root, splits)


# -- Flowers102: flowers-102/{jpg/image_00001.jpg, imagelabels.mat, setid.mat} -------------------------------
@dataclass
class Flowers102StandIn:
    root: Path
    split_ids: dict[str, list[int]]  # split -> 1-based image ids, in setid.mat's order
    labels: dict[int, int]  # image id -> 0-based class
    md5s: dict[str, str] = field(default_factory=dict)


#: stand-in flower photo sizes (width, height): landscape, portrait and square, as in the real set
FLOWER_SIZES = [(75, 50), (50, 66), (60, 60), (160, 120)]


def write_flowers102(root: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Flowers102StandIn:
    """JPEGs ``image_XXXXX.jpg`` (1-based ids), ``imagelabels.mat`` (``labels``: (1, N) uint8, classes 1..102)
    and ``setid.mat`` (``trnid``, ``valid``, ``tstid``: (1, n) uint16 image ids), written with scipy.

    Every split needs at least 2 images: torchvision loads with ``squeeze_me=True``, which turns a single id
    into a scalar.
    """
    from scipy.io import savemat

    sizes = sizes or {"train": 4, "val": 3, "test": 3}
    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True, exist_ok=True)
    total = sum(sizes.values())
    rng = np.random.default_rng(seed)
    ids = (rng.permutation(total) + 1).tolist()  # splits hold shuffled ids, as in the real setid.mat
    labels = {i: (29 * i) % 102 for i in range(1, total + 1)}
    labels[ids[0]] = 101  # the last class, 102 in the file
    for i in range(1, total + 1):
        width, height = FLOWER_SIZES[i % len(FLOWER_SIZES)]
        _photo(width, height, labels[i]).save(base / "jpg" / f"image_{i:05d}.jpg", quality=95)
    savemat(
        base / "imagelabels.mat",
        {"labels": np.array([[labels[i] + 1 for i in range(1, total + 1)]], np.uint8)},
    )
    split_ids, start = {}, 0
    for split, count in sizes.items():
        split_ids[split] = ids[start : start + count]
        start += count
    key = {"train": "trnid", "val": "valid", "test": "tstid"}
    savemat(base / "setid.mat", {key[s]: np.array([v], np.uint16) for s, v in split_ids.items()})
    md5s = {name: md5(base / name) for name in ("imagelabels.mat", "setid.mat")}
    return Flowers102StandIn(root, split_ids, labels, md5s)


def trust_flowers102(monkeypatch: pytest.MonkeyPatch, standin: Flowers102StandIn) -> None:
    """Make torchvision's Flowers102 expect the stand-in's md5s for its .mat files."""
    files = dict(datasets.Flowers102._file_dict)
    for key in ("label", "setid"):
        files[key] = (files[key][0], standin.md5s[files[key][0]])
    monkeypatch.setattr(datasets.Flowers102, "_file_dict", files)


# -- image folders -------------------------------------------------------------------------------------------
def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("cats", "dogs"), per_class: int = 4, corrupt: int = 0
) -> list[Path]:
    """``root/<class>/...`` PNGs and JPEGs of varying size and mode (RGB, grayscale, RGBA, a nested folder),
    plus ``corrupt`` broken files (a truncated JPEG, then text files named .png); returns the broken paths."""
    modes = ["RGB", "L", "RGBA", "RGB"]
    for c, name in enumerate(classes):
        for i in range(per_class):
            folder = root / name / ("nested" if i == per_class - 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            width, height = FLOWER_SIZES[i % len(FLOWER_SIZES)]
            img = _photo(width, height, c).convert(modes[i % len(modes)])
            img.save(folder / f"{name}_{i}.{'jpg' if img.mode != 'RGBA' and i % 2 else 'png'}")
    (root / classes[0] / "notes.txt").write_text("not an image: ignored")
    (root / classes[0] / ".hidden.png").write_bytes(b"hidden files are skipped")
    bad = []
    for k in range(corrupt):
        path = root / classes[k % len(classes)] / f"broken_{k}.{'jpg' if k == 0 else 'png'}"
        if k == 0:
            _photo(64, 48, 0).save(path, quality=95)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated mid-scan
        else:
            path.write_text("this is not a PNG")
        bad.append(path)
    return bad

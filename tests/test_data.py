"""DataModules on the real MNIST / Fashion-MNIST files: sizes, labels, range, split, and the missing-data errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torchvision import datasets

from ddpm_lightning.data import DatasetNotFoundError, FashionMNISTDataModule, MNISTDataModule
from ddpm_lightning.data.base import to_model_range, to_uint8


@pytest.mark.parametrize(
    ("cls", "first_counts", "mean"),
    [(MNISTDataModule, [5923, 6742], 0.1307), (FashionMNISTDataModule, [6000, 6000], 0.2860)],
)
def test_real_data_sizes_labels_and_pixels(shared_data, cls, first_counts, mean):
    dm = cls(root=str(shared_data), download=False, val_size=5000, batch_size=32)
    assert (dm.channels, dm.image_size, dm.num_classes) == (1, 28, 10)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    full = dm.train_set.dataset.tensors
    assert full[0].shape == (60000, 1, 28, 28) and full[0].dtype == torch.uint8
    assert torch.bincount(full[1]).tolist()[:2] == first_counts  # the README's documented class counts
    assert abs(full[0].float().mean().item() / 255 - mean) < 5e-4
    images, labels = next(iter(dm.train_dataloader()))
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # background pixels map to exactly -1
    assert torch.equal(y, labels)


def test_split_is_seeded_and_disjoint(shared_data):
    a = MNISTDataModule(root=str(shared_data), download=False, val_size=0.1, split_seed=3)
    b = MNISTDataModule(root=str(shared_data), download=False, val_size=0.1, split_seed=3)
    c = MNISTDataModule(root=str(shared_data), download=False, val_size=0.1, split_seed=4)
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.val_set.indices == b.val_set.indices
    assert a.val_set.indices != c.val_set.indices
    assert not set(a.val_set.indices) & set(a.train_set.indices)
    assert len(a.val_set) == 6000


def test_resize_and_flip_on_device(shared_data):
    dm = MNISTDataModule(root=str(shared_data), download=False, image_size=32, hflip=True)
    assert dm.image_size == 32
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    x, _ = dm.on_after_batch_transfer((images, torch.zeros(4, dtype=torch.long)), 0)
    assert x.shape == (4, 1, 32, 32)


def test_range_round_trip():
    u = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(u)
    assert x[0] == -1 and x[-1] == 1
    assert torch.equal(to_uint8(x), u)


def test_missing_dataset_offline_is_one_line(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path), download=False)
    dm.prepare_data()  # download off: nothing to do
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and f"{tmp_path}/MNIST/raw/" in msg and "train-images-idx3-ubyte" in msg


def test_failed_download_names_where_files_go(tmp_path, monkeypatch):
    def offline(self):  # what torchvision's download does on a machine without internet
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.FashionMNIST, "download", offline)
    dm = FashionMNISTDataModule(root=str(tmp_path))  # download defaults to on, for users
    assert dm.download
    with pytest.raises(DatasetNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "\n" not in msg and "download failed (URLError" in msg and f"{tmp_path}/FashionMNIST/raw/" in msg


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"batch_size": 0}, "batch_size"), ({"val_size": 1.5}, "val_size"), ({"image_size": 2}, "image_size")],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MNISTDataModule(**kwargs)

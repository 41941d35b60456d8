"""CIFAR-10, FGVC-Aircraft, Flowers102 and image-folder DataModules on stand-ins in the real on-disk formats.

torchvision's own parsers read the stand-ins written by tests/standins.py; every recipe runs ``fast_dev_run``
through the real CLI on them with a shrunken U-Net.
"""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from standins import (
    AIRCRAFT_BANNER,
    STANDIN_CONFIGS,
    label_color,
    trust_cifar10,
    trust_flowers102,
    write_cifar10,
    write_fgvc_aircraft,
    write_flowers102,
    write_image_folder,
)
from torchvision import datasets

from ddpm_lightning.cli import build_cli
from ddpm_lightning.data import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    FGVCAircraftDataModule,
    Flowers102DataModule,
    ImageFolderDataModule,
    UnreadableImageError,
)
from ddpm_lightning.data.transforms import SquareImageLoader

REPO = Path(__file__).resolve().parents[1]

#: JPEG and bicubic ringing keep a flat photo within this of its color; the aircraft banner would be ~120+ off
COLOR_TOLERANCE = 40


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    standin = write_cifar10(tmp_path)
    trust_cifar10(monkeypatch, standin)
    return standin


@pytest.fixture
def flowers(tmp_path, monkeypatch):
    standin = write_flowers102(tmp_path)
    trust_flowers102(monkeypatch, standin)
    return standin


def _batch(dm, loader: str = "train_dataloader") -> tuple[torch.Tensor, torch.Tensor]:
    """One batch as the model sees it: through the DataLoader and ``on_after_batch_transfer``."""
    images, labels = next(iter(getattr(dm, loader)()))
    assert images.dtype == torch.uint8
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(y, labels) and y.dtype == torch.int64
    return x, y


def _max_color_error(image: torch.Tensor, label: int) -> int:
    """Largest channel difference between a uint8 (3, H, W) image and the stand-in color of its label."""
    return (image.int() - torch.tensor(label_color(label))[:, None, None]).abs().max().item()


# -- CIFAR-10 ------------------------------------------------------------------------------------------------
def test_cifar10_reads_the_standin_exactly(cifar):
    dm = CIFAR10DataModule(root=str(cifar.root), download=False, val_size=4, batch_size=8)
    assert (dm.channels, dm.image_size, dm.num_classes) == (3, 32, 10)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 6)  # 5 x 4 train, 6 test
    images, labels = dm.train_set.dataset.tensors
    assert torch.equal(images, torch.from_numpy(cifar.train_images))  # (N, 3, 32, 32): channels where written
    assert labels.tolist() == cifar.train_labels
    assert torch.equal(dm.test_set.tensors[0], torch.from_numpy(cifar.test_images))
    x, _ = _batch(dm)
    assert x.shape == (8, 3, 32, 32)
    x, y = _batch(dm, "test_dataloader")
    assert y.tolist() == cifar.test_labels


def test_cifar10_resizes_to_image_size(cifar):
    dm = CIFAR10DataModule(root=str(cifar.root), download=False, val_size=4, batch_size=8, image_size=16)
    dm.setup("fit")
    assert _batch(dm)[0].shape == (8, 3, 16, 16)


def test_cifar10_corrupted_batch_is_named(cifar):
    (cifar.root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated download")
    dm = CIFAR10DataModule(root=str(cifar.root), download=False)
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "data_batch_3 is corrupted" in msg


# -- FGVC-Aircraft -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("level", "num_classes"), [("variant", 100), ("family", 70), ("manufacturer", 30)])
def test_aircraft_splits_and_labels(tmp_path, level, num_classes):
    standin = write_fgvc_aircraft(tmp_path)
    dm = FGVCAircraftDataModule(
        root=str(tmp_path), download=False, image_size=16, annotation_level=level, val_size=2, batch_size=4
    )
    assert (dm.channels, dm.image_size, dm.num_classes) == (3, 16, num_classes)
    dm.setup()
    full = dm.train_set.dataset  # the official trainval split (train + val), split again by the base
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 2, 4)
    assert full._labels == standin.labels("trainval", level)
    assert dm.test_set._labels == standin.labels("test", level)
    x, y = _batch(dm)
    assert x.shape == (4, 3, 16, 16) and int(y.max()) < num_classes


def test_aircraft_banner_is_cropped(tmp_path):
    standin = write_fgvc_aircraft(tmp_path)
    dm = FGVCAircraftDataModule(root=str(tmp_path), download=False, image_size=16, val_size=2)
    dm.setup()
    for ds in (dm.train_set.dataset, dm.test_set):
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
            assert _max_color_error(image, label) < COLOR_TOLERANCE, ds._image_files[i]
    # the stand-in's banner really is in the photos: kept, it would show in the square crop of a portrait
    image_id, variant = standin.splits["train"][2]  # AIRCRAFT_SIZES[2]: a 48 x (64 + 20) portrait
    path = tmp_path / "fgvc-aircraft-2013b" / "data" / "images" / f"{image_id}.jpg"
    assert Image.open(path).size == (48, 64 + AIRCRAFT_BANNER)
    assert _max_color_error(SquareImageLoader(16)(path), variant) > 100


# -- Flowers102 ----------------------------------------------------------------------------------------------
def test_flowers_trains_on_train_plus_val(flowers):
    dm = Flowers102DataModule(root=str(flowers.root), download=False, image_size=16, val_size=2, batch_size=4)
    assert (dm.channels, dm.image_size, dm.num_classes) == (3, 16, 102)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (5, 2, 3)  # (4 + 3) train + val, 3 test
    full = dm.train_set.dataset
    expected = [flowers.labels[i] for i in flowers.split_ids["train"] + flowers.split_ids["val"]]
    assert [full[i][1] for i in range(len(full))] == expected
    assert 101 in expected  # class 102 in the file maps to the last label
    image, label = full[0]
    assert image.shape == (3, 16, 16) and _max_color_error(image, label) < COLOR_TOLERANCE
    x, _ = _batch(dm)
    assert x.shape == (4, 3, 16, 16)


# -- image folders -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("class_subfolders", "channels"), [(True, 3), (False, 1)])
def test_image_folder_labels_and_channels(tmp_path, class_subfolders, channels):
    write_image_folder(tmp_path)  # cats/ and dogs/, 4 images each (PNG/JPEG, RGB/L/RGBA, one nested)
    dm = ImageFolderDataModule(
        root=str(tmp_path),
        image_size=16,
        class_subfolders=class_subfolders,
        channels=channels,
        val_size=2,
        batch_size=3,
    )
    assert (dm.channels, dm.image_size, dm.num_classes) == (channels, 16, 2 if class_subfolders else 0)
    dm.setup("fit")
    full = dm.train_set.dataset
    assert len(full) == 8 and dm.num_skipped == 0  # notes.txt and .hidden.png ignored
    assert full.labels == ([0] * 4 + [1] * 4 if class_subfolders else [0] * 8)
    assert all(Path(p).parent.name in ("cats", "dogs", "nested") for p in full.paths)
    x, _ = _batch(dm)
    assert x.shape == (3, channels, 16, 16)
    dm.setup("test")
    assert dm.test_set is dm.val_set  # a folder has no test split


def test_image_folder_corrupt_image_is_named(tmp_path):
    bad = write_image_folder(tmp_path, corrupt=2)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16)
    with pytest.raises(UnreadableImageError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert str(bad[0]) in msg and "2 of 10 files unreadable" in msg and "on_corrupt: skip" in msg


def test_image_folder_skips_and_counts_corrupt_images(tmp_path, lightning_caplog):
    caplog = lightning_caplog
    bad = write_image_folder(tmp_path, corrupt=3)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, on_corrupt="skip", val_size=2)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
        dm.setup("test")
    assert dm.num_skipped == 3 and sorted(dm.skipped_files) == sorted(map(str, bad))
    assert len(dm.train_set) + len(dm.val_set) == 8
    assert sum("skipped 3 unreadable of 11 images" in r.getMessage() for r in caplog.records) == 1
    images = torch.stack([image for image, _ in dm.train_set])  # nothing unreadable left to hit mid-epoch
    assert images.shape == (6, 3, 16, 16)


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"), image_size=16).setup("fit")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetNotFoundError, match=r"no \.png/\.jpg/\.jpeg images found under"):
        ImageFolderDataModule(root=str(tmp_path), image_size=16).setup("fit")
    with pytest.raises(DatasetNotFoundError, match="has no subfolders"):
        _ = ImageFolderDataModule(root=str(tmp_path), image_size=16, class_subfolders=True).num_classes
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "full_class").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "full_class" / "a.png")
    with pytest.raises(DatasetNotFoundError, match="empty_class holds no"):
        ImageFolderDataModule(root=str(tmp_path), image_size=16, class_subfolders=True).setup("fit")


# -- the per-sample loader -----------------------------------------------------------------------------------
def test_square_loader_crops_converts_and_names_bad_files(tmp_path):
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20], stripes[:, 20:40], stripes[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    assert SquareImageLoader(8)(tmp_path / "wide.png").float().mean((1, 2)).tolist() == [0.0, 255.0, 0.0]
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert SquareImageLoader(4, channels=1)(tmp_path / "clear.png").eq(255).all()  # transparent -> white
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 16-bit values up to 65,472
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    gray = SquareImageLoader(32, channels=1)(tmp_path / "deep.png")
    assert gray.shape == (1, 32, 32) and 0.4 < gray.float().mean() / 255 < 0.6  # scaled, not clipped at 255
    halves = np.zeros((40, 64, 3), np.uint8)
    halves[:, :32] = 255  # stored: white left half; EXIF orientation 6 shows it rotated: white top half
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    Image.fromarray(halves).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    shown = SquareImageLoader(8)(tmp_path / "rotated.jpg").float()
    assert shown[:, 0].mean() > 200 and shown[:, -1].mean() < 50
    (tmp_path / "fake.jpg").write_text("not a JPEG")
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*fake\.jpg \(UnidentifiedImageError"):
        SquareImageLoader(8)(tmp_path / "fake.jpg")


# -- bad values and missing data -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        (
            FGVCAircraftDataModule,
            {"image_size": 64, "annotation_level": "model"},
            "variant, family, manufacturer",
        ),
        (ImageFolderDataModule, {"root": "x", "image_size": 64, "channels": 2}, "one of: 1, 3"),
        (
            ImageFolderDataModule,
            {"root": "x", "image_size": 64, "on_corrupt": "ignore"},
            "one of: error, skip",
        ),
        (FGVCAircraftDataModule, {}, "needs image_size"),
        (Flowers102DataModule, {}, "needs image_size"),
        (ImageFolderDataModule, {"root": "x"}, "needs image_size"),
        (Flowers102DataModule, {"image_size": 64, "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        cls(**kwargs)


#: (DataModule, torchvision class, its download method, a path under root and a file name the message names)
TORCHVISION_MODULES = {
    "cifar10": (CIFAR10DataModule, datasets.CIFAR10, "download", "cifar-10-batches-py/", "data_batch_1..5"),
    "aircraft": (
        FGVCAircraftDataModule,
        datasets.FGVCAircraft,
        "_download",
        "fgvc-aircraft-2013b/data/images/*.jpg",
        "images_variant_{trainval,test}.txt",
    ),
    "flowers": (Flowers102DataModule, datasets.Flowers102, "download", "flowers-102/jpg/", "setid.mat"),
}


@pytest.mark.parametrize("name", TORCHVISION_MODULES)
def test_missing_dataset_offline_is_one_line(tmp_path, name):
    cls, _, _, path, file = TORCHVISION_MODULES[name]
    dm = cls(root=str(tmp_path), download=False, image_size=16)
    dm.prepare_data()  # download off: nothing to do
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "not found" in msg
    assert f"{tmp_path}/{path}" in msg and file in msg, msg


@pytest.mark.parametrize("name", TORCHVISION_MODULES)
def test_failed_download_names_where_files_go(tmp_path, monkeypatch, name):
    cls, tv_cls, method, path, _ = TORCHVISION_MODULES[name]

    def offline(self):  # what torchvision's download does on a machine without internet
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cls, method, offline)
    dm = cls(root=str(tmp_path), image_size=16)  # download defaults to on, for users
    assert dm.download
    with pytest.raises(DatasetNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "\n" not in msg and "download failed (URLError" in msg and f"{tmp_path}/{path}" in msg


# -- recipes -------------------------------------------------------------------------------------------------
#: overrides that shrink any recipe to a few-thousand-parameter U-Net (on 16x16 images: ``--data.image_size``)
TINY_ARGS = [
    "--model.base_channels=8",
    "--model.channel_mults=[1,2]",
    "--model.num_res_blocks=1",
    "--model.attention_resolutions=[8]",
    "--model.num_groups=4",
    "--model.num_heads=1",
    "--data.batch_size=2",
    "--data.val_size=2",
    "--data.num_workers=0",
    "--data.pin_memory=false",
    "--trainer.fast_dev_run=1",
]


@pytest.mark.parametrize("config", sorted(STANDIN_CONFIGS))
def test_every_recipe_runs_fast_dev_run(config, tmp_path, monkeypatch):
    data = tmp_path / "data"
    args = ["--data.image_size=16", "--data.download=false"]
    if config == "cifar10":
        trust_cifar10(monkeypatch, write_cifar10(data))
        num_classes = 10
    elif config == "aircraft64":
        write_fgvc_aircraft(data)
        num_classes = 100
    elif config == "flowers128":
        trust_flowers102(monkeypatch, write_flowers102(data))
        num_classes = 102
    else:
        write_image_folder(data)
        args, num_classes = args[:1], 0  # an image folder has nothing to download
    monkeypatch.chdir(tmp_path)
    config_path = REPO / "configs" / f"{config}.yaml"
    cli = build_cli(["fit", f"--config={config_path}", f"--data.root={data}", *TINY_ARGS, *args])
    assert cli.trainer.state.finished
    hp = cli.model.hparams
    assert (hp.in_channels, hp.image_size, hp.num_classes) == (3, 16, num_classes)  # linked from the data
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_cifar10_recipe_is_the_papers_setup(tmp_path, monkeypatch):
    """Ho et al. 2020, Sec. 4 / App. B: 35.7M parameters, T=1000 linear, Adam 2e-4, 5k warm-up, batch 128."""
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "cifar10.yaml"
    cli = build_cli([f"--config={config}", "--data.download=false"], run=False)  # builds, touches no data
    n = sum(p.numel() for p in cli.model.net.parameters())
    assert abs(n - 35.7e6) <= 0.1e6, n
    recipe = yaml.safe_load(config.read_text())
    model, data, trainer = recipe["model"], recipe["data"]["init_args"], recipe["trainer"]
    assert (model["schedule"], model["num_timesteps"], model["dropout"]) == ("linear", 1000, 0.1)
    # the paper's Adam at 2e-4; fused only chooses how the update is computed
    assert model["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.0002, "fused": True}}
    assert model["warmup_steps"] == 5000 and "lr_scheduler" not in model
    assert (data["batch_size"], data["hflip"]) == (128, True)
    assert (trainer["gradient_clip_val"], trainer["max_steps"]) == (1.0, 800_000)
    ema = next(c for c in trainer["callbacks"] if c["class_path"].endswith(".EMA"))
    assert ema["init_args"]["decay"] == 0.9999


def test_standin_configs_exist():
    assert STANDIN_CONFIGS <= {c.stem for c in (REPO / "configs").glob("*.yaml")}

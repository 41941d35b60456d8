"""HFDataModule on real MNIST digits turned into Hugging Face datasets inside the tests (never the network): a
save_to_disk folder, parquet files and a filled offline Hub cache; bad input in one line; `ddpm fit` and `ddpm test`."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, TINY_MODEL_ARGS
from PIL import Image

try:
    import datasets
except ModuleNotFoundError:
    if os.environ.get("CI"):  # CI installs [dev], which pulls in [hf]: its absence is a broken install
        raise
    pytest.skip("the [hf] extra (datasets) is not installed", allow_module_level=True)

from ddpm_lightning.cli import build_cli
from ddpm_lightning.data import HFDataModule
from ddpm_lightning.main import main

pytestmark = pytest.mark.usefixtures("no_network")  # every test: no look-up or connection beyond loopback


@pytest.fixture(autouse=True)
def _no_download_counts(monkeypatch):
    """datasets pings S3 to count loads of its parquet/imagefolder builders, even of local files, unless offline or
    HF_UPDATE_DOWNLOAD_COUNTS is off (docs/datasets.md says so); not ours to test, and no_network would see it."""
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)


CONFIG = REPO / "configs" / "hf_dataset.yaml"
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_TRAIN, N_TEST = 40, 16
HUB_NAME = "ddpm-test/digits"  # never on the Hub: read from a cache filled here


@pytest.fixture(scope="module")
def mnist(shared_data):
    """The first N_TRAIN train and N_TEST test digits of real MNIST: uint8 (N, 28, 28) and labels (N,)."""
    from torchvision.datasets import MNIST

    train, test = (MNIST(str(shared_data), train=t, download=False) for t in (True, False))
    return {
        "train": (train.data[:N_TRAIN], train.targets[:N_TRAIN]),
        "test": (test.data[:N_TEST], test.targets[:N_TEST]),
    }


def _digits(images: torch.Tensor, labels: torch.Tensor) -> datasets.Dataset:
    """An Image column of PNG digits, a ClassLabel and a string column (the class name)."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES), "name": datasets.Value("string")}
    )
    rows = {
        "image": [Image.fromarray(x.numpy()) for x in images],
        "label": labels.tolist(),
        "name": [NAMES[y] for y in labels.tolist()],
    }
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="module")
def digits(mnist, tmp_path_factory):
    """The digits as a save_to_disk folder, parquet files and a filled Hub cache (folder paths)."""
    root = tmp_path_factory.mktemp("hf")
    dd = datasets.DatasetDict({split: _digits(*mnist[split]) for split in ("train", "test")})
    dd.save_to_disk(str(root / "disk"))
    for split in dd:
        dd[split].to_parquet(str(root / "parquet" / f"{split}.parquet"))
    # a Hub download's cache layout: <cache>/<namespace>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow
    files = {split: str(root / "parquet" / f"{split}.parquet") for split in dd}
    builder = datasets.load_dataset_builder("parquet", data_files=files, cache_dir=str(root / "build"))
    builder.download_and_prepare()
    (built,) = [p for p in glob.glob(str(root / "build" / "parquet" / "*" / "*" / "*")) if os.path.isdir(p)]
    cached = root / "hub_cache" / HUB_NAME.replace("/", "___") / "default" / "0.0.0" / "0123abcd"
    cached.parent.mkdir(parents=True)
    shutil.copytree(built, cached)
    for old in cached.glob("parquet-*.arrow"):
        old.rename(cached / old.name.replace("parquet-", "digits-"))
    return root


def _all(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def test_save_to_disk_folder_holds_the_digits_labels_and_class_names(digits, mnist, tmp_path):
    dm = HFDataModule(str(digits / "disk"), label_column="label", image_size=28, channels=1, val_size=8)
    dm.cache_dir = str(tmp_path)
    assert (dm.channels, dm.image_size, dm.num_classes, dm.classes) == (1, 28, 10, NAMES)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (N_TRAIN - 8, 8, N_TEST)
    images, labels = _all(dm.test_set)
    assert torch.equal(images, mnist["test"][0].unsqueeze(1)) and torch.equal(labels, mnist["test"][1])  # exact
    # train + val are the training split, split disjointly
    train, val = _all(dm.train_set)[1], _all(dm.val_set)[1]
    assert sorted(torch.cat([train, val]).tolist()) == sorted(mnist["train"][1].tolist())
    real, real_labels = dm.real_images("test", 5, seed=0)
    assert real.shape == (5, 1, 28, 28) and real.dtype == torch.uint8


def test_parquet_files_slices_resize_and_rgb_in_two_processes(digits, mnist, tmp_path):
    path = str(digits / "parquet" / "train.parquet")  # one file: one split, `train`
    dm = HFDataModule(path, train_split="train[:75%]", val_split="train[75%:]", image_size=16, cache_dir=str(tmp_path))
    dm.num_proc = 2
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), dm.num_classes, dm.channels) == (30, 10, 0, 3)
    assert dm.test_set is dm.val_set  # no test split: the test images are the validation images
    images, labels = _all(dm.val_set)
    assert images.shape == (10, 3, 16, 16) and labels.eq(0).all()  # no label_column: every label 0
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])  # gray as RGB
    # the 16 px squares are the digits resized (PIL bicubic of the same pixels, bit for bit)
    want = [Image.fromarray(x.numpy()).resize((16, 16), Image.Resampling.BICUBIC) for x in mnist["train"][0][30:]]
    assert torch.equal(images[:, 0], torch.stack([torch.as_tensor(list(w.getdata())).view(16, 16) for w in want]))


def test_parquet_rewritten_in_place_gets_a_new_reference_key(digits, mnist, tmp_path):
    path = tmp_path / "digits.parquet"
    shutil.copy(digits / "parquet" / "train.parquet", path)
    args = {"image_size": 28, "channels": 1, "cache_dir": str(tmp_path / "hf"), "val_size": 10}
    key = HFDataModule(str(path), **args).reference_key("test")  # no test split: the 10 held-out training digits
    assert (key["hf_split"], key["rows"]) == ("train held out: val_size=10, split_seed=0", 10)
    assert HFDataModule(str(path), **args).reference_key("test") == key  # same file: same key
    assert HFDataModule(str(path), **args, split_seed=1).reference_key("test") != key  # other held-out digits
    _digits(*mnist["test"]).to_parquet(str(path))  # other rows under the same name
    changed = HFDataModule(str(path), **args).reference_key("test")
    assert changed["fingerprint"] != key["fingerprint"]


def test_hub_name_offline_from_a_filled_cache(digits, mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read when datasets is imported: set it here too
    dm = HFDataModule(HUB_NAME, label_column="label", image_size=28, channels=1, cache_dir=str(digits / "hub_cache"))
    assert dm.num_classes == 10
    dm.setup("test")
    images, labels = _all(dm.test_set)
    assert torch.equal(images, mnist["test"][0].unsqueeze(1)) and torch.equal(labels, mnist["test"][1])


def test_reference_statistics_follow_the_data(digits, mnist, tmp_path, lightning_caplog):
    """Same data: the cached statistics are reused; changed rows under the same path: new statistics."""
    from ddpm_lightning.metrics.evaluate import reference_stats
    from ddpm_lightning.metrics.extractors import ClassifierExtractor

    folder, cache, ex = tmp_path / "disk", tmp_path / "stats", ClassifierExtractor("mnist")
    shutil.copytree(digits / "disk", folder)
    args = {"label_column": "label", "image_size": 28, "channels": 1, "cache_dir": str(tmp_path / "hf")}
    first = reference_stats(HFDataModule(str(folder), **args), "test", 8, ex, cache)
    again = reference_stats(HFDataModule(str(folder), **args), "test", 8, ex, cache)
    assert again[2] == first[2] and torch.equal(again[0].mu, first[0].mu)
    assert "reference statistics reused" in lightning_caplog.text
    shutil.rmtree(folder)
    datasets.DatasetDict({s: _digits(*mnist["train"]) for s in ("train", "test")}).save_to_disk(str(folder))
    changed = reference_stats(HFDataModule(str(folder), **args), "test", 8, ex, cache)
    assert changed[2] != first[2] and not torch.equal(changed[0].mu, first[0].mu)
    assert len(list(cache.glob("HFDataModule-test-28px-*.pt"))) == 2


def _fit_args(path, run, *extra) -> list[str]:
    args = ["fit", f"--config={CONFIG}", f"--data.path={path}", *TINY_MODEL_ARGS, "--model.num_timesteps=100"]
    args += ["--data.image_size=28", "--data.channels=1", "--data.num_proc=null", "--data.num_workers=0"]
    args += ["--data.pin_memory=false", "--data.batch_size=8", "--data.val_size=8", "--data.hflip=false"]
    args += [f"--data.cache_dir={run / 'hf_cache'}", "--trainer.precision=32-true", "--trainer.accelerator=cpu"]
    args += [f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}"]
    return [*args, *extra]


#: the recipe's callbacks with a grid cheap enough for a test: 2 samples per class, 4 DDIM steps
SMALL_GRID = """
trainer:
  callbacks:
    - class_path: ddpm_lightning.callbacks.SampleGrid
      init_args: {samples_per_class: 2, sampling: {sampler: ddim, num_steps: 4}, trajectory_images: 1}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true}
"""


def test_fit_on_a_save_to_disk_folder_is_conditional_and_logs_grids_then_test_scores_it(digits, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # `ddpm sweep` caches reference statistics there
    conditional = ["--data.label_column=label", "--model.conditional=true"]
    (tmp_path / "grid.yaml").write_text(SMALL_GRID)
    steps = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    cli = build_cli(_fit_args(digits / "disk", tmp_path, *conditional, *steps, f"--config={tmp_path / 'grid.yaml'}"))
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    hp = cli.model.hparams
    assert (hp.in_channels, hp.image_size, hp.num_classes, hp.conditional) == (1, 28, 10, True)  # linked
    version = tmp_path / "lightning_logs" / "version_0"
    grid = Image.open(next((version / "samples").glob("epoch=000.png")))
    events = EventAccumulator(str(version), size_guidance={"images": 0}).Reload()
    assert {"samples/grid", "samples/trajectory"} <= set(events.Tags()["images"])  # logged to TensorBoard
    gutter = 2  # ddpm_lightning.images.GUTTER
    assert grid.size == (2 * (28 + gutter) + gutter, 10 * (28 + gutter) + gutter)  # a row per class, 2 per row
    rows = (version / "samples" / "grid_rows.txt").read_text().splitlines()  # the ClassLabel's names, row by row
    assert rows == [f"row {i}: {name}" for i, name in enumerate(NAMES)]
    assert "samples/grid_rows/text_summary" in events.Tags()["tensors"]  # TensorBoard text

    ckpt = version / "checkpoints" / "last.ckpt"
    args = _fit_args(digits / "disk", tmp_path, *conditional, f"--ckpt_path={ckpt}", "--trainer.logger=false")
    args[0] = "test"
    args += ["--trainer.limit_test_batches=1", "--metrics.extractors=[classifier]", "--metrics.classifier=mnist"]
    args += ["--metrics.num_samples=10", "--metrics.batch_size=10", "--metrics.sampling.num_steps=5"]
    args += [f"--metrics.cache_dir={tmp_path / 'stats'}"]
    main(args)
    (result,) = ckpt.parent.glob("last.metrics.*.json")
    scores = json.loads(result.read_text())
    assert scores["results"]["fid_classifier"] > 0 and scores["settings"]["reference_split"] == "test"
    (stats,) = (tmp_path / "stats").glob("HFDataModule-test-28px-n10-*.pt")
    key = torch.load(stats, weights_only=True)["key"]
    assert (key["hf_split"], key["rows"]) == ("test", N_TEST)  # the dataset's own test split

    # `ddpm sweep` reads the data from a copy of the recipe with data.path set (and the model it trained)
    recipe = yaml.safe_load(CONFIG.read_text())
    tiny = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [14]}
    recipe["model"].update(tiny, num_groups=4, num_timesteps=100, conditional=True)
    recipe["data"]["init_args"].update(path=str(digits / "disk"), image_size=28, channels=1, label_column="label")
    recipe["data"]["init_args"].update(num_proc=None, cache_dir=str(tmp_path / "hf_cache"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    sweep = ["sweep", f"--config={tmp_path / 'recipe.yaml'}", f"--ckpt_path={ckpt}", "--extractors", "classifier"]
    main([*sweep, "--steps", "2", "--samplers", "ddim", "--num_samples=10", f"--out_dir={tmp_path / 'sweep'}"])
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in table["rows"]] == [("ddim", 2)] and table["rows"][0][
        "fid_classifier"
    ] > 0
    assert table["floor"]["fid_classifier"] > 0  # N real training digits against the test digits


def _one_line_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--data.image_column=img"], "image_column 'img' is not a column of {disk}; its columns: image, label, name"),
        (["--data.image_column=label"], "image_column 'label' of {disk} holds a ClassLabel, not images (Image columns"),
        (
            ["--data.label_column=name"],
            "label_column 'name' of {disk} holds string values, not a ClassLabel or integer",
        ),
        (["--data.train_split=validation"], "split 'validation' is not in {disk}; its splits: train, test"),
        (["--data.val_split=train[40:]"], "split 'train[40:]' of {disk} has no rows"),
        (["--data.path={tmp}/absent"], "cannot open Hugging Face dataset '{tmp}/absent'"),
    ],
    ids=["unknown-column", "not-an-image", "label-not-integer", "unknown-split", "empty-split", "missing-folder"],
)
def test_bad_input_is_one_line(extra, needle, digits, tmp_path, capsys):
    fmt = {"disk": digits / "disk", "tmp": tmp_path}
    args = _fit_args(digits / "disk", tmp_path, *(e.format(**fmt) for e in extra), "--trainer.max_steps=1")
    assert needle.format(**fmt) in _one_line_error(args, capsys)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_hub_name_offline_without_cache_says_where_to_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    args = _fit_args(HUB_NAME, tmp_path, "--data.label_column=label", "--trainer.max_steps=1")
    err = _one_line_error(args, capsys)
    assert f"Hugging Face dataset '{HUB_NAME}' is not in {tmp_path / 'hf_cache'}" in err
    assert "on a machine with internet" in err and "data.cache_dir" in err and "save_to_disk" in err


@pytest.mark.slow  # a fresh interpreter imports torch and Lightning
def test_other_datamodules_never_import_datasets():
    code = "import sys, ddpm_lightning.cli, ddpm_lightning.data; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_an_unreadable_image_stops_setup_naming_its_row(mnist, tmp_path):
    from ddpm_lightning.data import UnreadableImageError

    ds = _digits(*mnist["test"]).cast_column("image", datasets.Image(decode=False))
    rows = ds.to_dict()
    rows["image"][3] = {"bytes": b"not a png", "path": None}
    datasets.Dataset.from_dict(rows, features=ds.features).save_to_disk(str(tmp_path / "broken"))
    dm = HFDataModule(str(tmp_path / "broken"), image_size=28, channels=1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UnreadableImageError, match=r"\[train\] row 3 \(UnidentifiedImageError: .*1 of 16 images"):
        dm.setup("fit")

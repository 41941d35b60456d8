"""``ddpm classifier export``: a trained ClassifierModule checkpoint -> the small weights file the metrics load.

    ddpm classifier export --checkpoint CKPT --out ddpm_lightning/assets/mnist_classifier.pt --dataset mnist \\
        --data_root ../shared/data

Loads the checkpoint, measures its accuracy on the dataset's real test split and exports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser, Namespace

DESCRIPTION = "Export a classifier checkpoint as a small weights file, with its test accuracy."


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=str, required=True, help="Lightning checkpoint of ClassifierModule")
    parser.add_argument("--out", type=str, required=True, help="output file, e.g. ddpm_lightning/assets/x.pt")
    parser.add_argument("--dataset", type=Literal["mnist", "fashion_mnist"], required=True)
    parser.add_argument(
        "--data_root", type=str, default="data", help="root of the dataset whose test split is measured"
    )


def run(cfg: Namespace) -> float:
    from ddpm_lightning.classifier import accuracy, export_classifier, load_classifier, load_test_split

    model = load_classifier(cfg.checkpoint)
    images, labels = load_test_split(cfg.dataset, cfg.data_root)
    test_acc = accuracy(model, images, labels)
    export_classifier(model, cfg.out, cfg.dataset, test_acc)
    size_kb = Path(cfg.out).stat().st_size / 1024
    print(f"wrote {cfg.out} ({size_kb:.0f} KiB): {cfg.dataset} test accuracy {test_acc:.4f} on {len(labels)} images")
    return test_acc

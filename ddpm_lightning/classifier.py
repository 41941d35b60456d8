"""A small domain classifier for MNIST-like data: "classifier FID" features and conditional accuracy.

Inception-v3 features (the FID standard) are slow on CPU and were never trained on digits. For MNIST and
Fashion-MNIST the project trains its own small CNN instead (``configs/classifier_mnist.yaml``,
``configs/classifier_fashion_mnist.yaml``) and ships its weights in ``ddpm_lightning/assets``:

- :meth:`ClassifierModule.features` gives the penultimate activations, (B, feature_dim), for a fast FID;
- :meth:`ClassifierModule.forward` gives logits, (B, num_classes), for conditional accuracy: of the samples asked
  to be a 7, the fraction the classifier calls a 7 (:func:`accuracy`).

Convention: inputs are float images in [-1, 1], (B, C, H, W), the range the DDPM trains on and samples in, so
real batches (after the DataModule's ``on_after_batch_transfer``) and samples go in as they are.

Retrain and re-export::

    ddpm classifier fit --config configs/classifier_mnist.yaml
    ddpm classifier export --checkpoint lightning_logs/version_0/checkpoints/last.ckpt \\
        --out ddpm_lightning/assets/mnist_classifier.pt --dataset mnist --data_root data
"""

from __future__ import annotations

import inspect
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

ClassifierName = Literal["mnist", "fashion_mnist"]
#: shipped classifiers: name -> file in ddpm_lightning/assets
SHIPPED_CLASSIFIERS: dict[str, str] = {
    "mnist": "mnist_classifier.pt",
    "fashion_mnist": "fashion_mnist_classifier.pt",
}
SCHEDULER_INTERVALS = ("epoch", "step")
#: background value of MNIST-like images in [-1, 1] (black), used to fill the border uncovered by a shift
BACKGROUND = -1.0
#: side of the last feature map before flattening (7x7 -> 3x3 for 28x28 inputs)
POOLED_SIZE = 3


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),  # bias is redundant before BN
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class ClassifierNet(nn.Module):
    """CNN: conv blocks (3x3 conv, BatchNorm, ReLU) at three resolutions, then an MLP head.

    For 28x28 inputs: 2 blocks at 28x28 (``width`` channels), max-pool, 2 at 14x14 (``2 width``), max-pool, 2 at
    7x7 (``4 width``), adaptive max-pool to 3x3 (overlapping windows, so no border row is dropped), flatten,
    linear to ``feature_dim``, ReLU: the features. Then dropout and a linear layer to the logits. The 3x3 map keeps
    coarse layout (where the strokes are), which a global pool would lose; measured on MNIST, same 2-epoch run:
    99.2% validation accuracy against 98.6% with a global average pool after the fifth block.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, feature_dim: int, dropout: float) -> None:
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            *_conv_block(in_channels, w),
            *_conv_block(w, w),
            nn.MaxPool2d(2),
            *_conv_block(w, 2 * w),
            *_conv_block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w),
            *_conv_block(4 * w, 4 * w),
            nn.AdaptiveMaxPool2d(POOLED_SIZE),
            nn.Flatten(),  # (B, 4w * 3 * 3)
            nn.Linear(4 * w * POOLED_SIZE**2, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> penultimate activations (B, feature_dim), non-negative (after ReLU)."""
        # channels-last convolutions run about 2x faster on CPU (oneDNN) than NCHW; measured at batch 100-250
        return self.trunk(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by its own integer offset in [-max_shift, max_shift] on each axis (a light augmentation).

    Pixels shifted in from outside are background (-1, black). (B, C, H, W) -> (B, C, H, W).
    """
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=BACKGROUND)  # (B, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), device=x.device, generator=generator)  # (B, 1) each
    rows = dy + torch.arange(h, device=x.device)  # (B, H)
    cols = dx + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: (B, H, W, C)
    return crops.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory, as the convolutions prefer


class ClassifierModule(L.LightningModule):
    """Image classifier over :class:`ClassifierNet`, trained with cross-entropy. Glue only.

    Data-decided sizes (``in_channels``, ``image_size``, ``num_classes``) are linked from the DataModule by the CLI.

    Args:
        in_channels: image channels (linked from ``data.channels``).
        image_size: image side length (linked from ``data.image_size``); inputs of another size are refused.
        num_classes: number of labels (linked from ``data.num_classes``), >= 2.
        width: channels of the first conv blocks (then 2x and 4x).
        feature_dim: size of the penultimate layer, the features used for FID.
        dropout: dropout before the last linear layer, in [0, 1).
        max_shift: training augmentation: random translations of up to this many pixels (0 = none).
        optimizer: optimizer class and arguments (YAML ``class_path``/``init_args``).
        lr_scheduler: optional learning-rate scheduler.
        lr_scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width: int = 16,
        feature_dim: int = 128,
        dropout: float = 0.0,
        max_shift: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs a dataset with class labels (num_classes >= 2), got {num_classes}")
        if width < 1 or feature_dim < 1:
            raise ValueError(f"width and feature_dim must be >= 1, got {width} and {feature_dim}")
        if image_size < 4 * POOLED_SIZE:
            raise ValueError(
                f"image_size must be >= {4 * POOLED_SIZE} (two 2x poolings before the final pool), got {image_size}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 <= max_shift < image_size // 2:
            raise ValueError(f"max_shift must be in [0, image_size / 2), got {max_shift}")
        if lr_scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(
                f"unknown lr_scheduler_interval {lr_scheduler_interval!r}; choose one of: "
                + ", ".join(SCHEDULER_INTERVALS)
            )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = ClassifierNet(in_channels, num_classes, width, feature_dim, dropout)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    @property
    def feature_dim(self) -> int:
        return int(self.hparams.feature_dim)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"classifier expects images of shape (B, {shape}), got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> penultimate features (B, feature_dim). Call in eval mode for FID."""
        self._check_input(x)
        return self.net.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""
        self._check_input(x)
        return self.net(x)

    # -- steps ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, C, H, W) in [-1, 1], (B,)
        loss = F.cross_entropy(self(random_shift(x, self.hparams.max_shift)), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        if self._trainer is not None:
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: Literal["val", "test"]) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        # batch_size weights the epoch mean, so val/acc and test/acc are exact fractions of the whole split
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=x.shape[0])
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val", sync_dist=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return [optimizer], [{"scheduler": scheduler, "interval": self.hparams.lr_scheduler_interval}]


# -- evaluation -------------------------------------------------------------------------------------------------
@torch.inference_mode()
def accuracy(classifier: ClassifierModule, images: Tensor, labels: Tensor, batch_size: int = 250) -> float:
    """Fraction of ``images`` (N, C, H, W) in [-1, 1] that ``classifier`` assigns to ``labels`` (N,).

    With generated images and the labels they were asked for, this is the conditional accuracy. Runs on the
    classifier's device, in batches, in eval mode (the caller's train/eval mode is restored). Batches of a few
    hundred images are the fastest on CPU: larger ones fall out of the cache (1000 is ~1.5x slower than 250).
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    was_training = classifier.training
    classifier.eval()
    try:
        correct = 0
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(classifier.device)
            y = labels[start : start + batch_size].to(classifier.device)
            correct += int((classifier(x).argmax(dim=1) == y).sum())
    finally:
        classifier.train(was_training)
    return correct / max(images.shape[0], 1)


# -- loading and export -----------------------------------------------------------------------------------------
def _from_dict(checkpoint: dict[str, Any]) -> ClassifierModule:
    """Build a frozen, eval-mode classifier from an asset dict or a Lightning checkpoint (same two keys)."""
    params = inspect.signature(ClassifierModule.__init__).parameters
    # Lightning adds private keys (e.g. ``_instantiator``) beside the constructor arguments
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in params}
    model = ClassifierModule(**hparams)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    model.requires_grad_(False)
    return model


def load_classifier(name: ClassifierName | str, map_location: str | torch.device = "cpu") -> ClassifierModule:
    """A trained classifier, in eval mode with ``requires_grad`` off.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"`` for the weights shipped in ``ddpm_lightning/assets``, or a path to a
            Lightning checkpoint of :class:`ClassifierModule` (or to a file written by :func:`export_classifier`).
        map_location: device to load the weights onto.
    """
    if name in SHIPPED_CLASSIFIERS:
        asset = resources.files("ddpm_lightning") / "assets" / SHIPPED_CLASSIFIERS[name]
        if not asset.is_file():
            raise FileNotFoundError(f"shipped classifier weights missing: {asset} (reinstall ddpm-lightning)")
        with resources.as_file(asset) as path:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    elif Path(name).is_file():
        checkpoint = torch.load(name, map_location=map_location, weights_only=True)
    else:
        raise ValueError(
            f"unknown classifier {name!r}; choose one of: {', '.join(SHIPPED_CLASSIFIERS)}, "
            "or give the path of a ClassifierModule checkpoint"
        )
    return _from_dict(checkpoint).to(map_location, memory_format=torch.channels_last)


def export_classifier(
    classifier: ClassifierModule, out: str | Path, dataset: str, test_accuracy: float | None
) -> dict[str, Any]:
    """Write a trained classifier as a small asset file: hyperparameters and weights, no optimizer state.

    The file holds ``{"hyper_parameters", "state_dict", "test_accuracy", "dataset"}``, tensors and plain values
    only, readable with ``torch.load(weights_only=True)`` and by :func:`load_classifier`. Returns the dict written.
    """
    asset = {
        "hyper_parameters": dict(classifier.hparams),
        "state_dict": classifier.state_dict(),
        "test_accuracy": test_accuracy,
        "dataset": dataset,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(asset, out)
    return asset


def load_test_split(dataset: ClassifierName, root: str) -> tuple[Tensor, Tensor]:
    """The real 10k test split as (N, 1, 28, 28) floats in [-1, 1] and (N,) labels."""
    from ddpm_lightning.data import FashionMNISTDataModule, MNISTDataModule
    from ddpm_lightning.images import to_model_range

    datamodules = {"mnist": MNISTDataModule, "fashion_mnist": FashionMNISTDataModule}
    if dataset not in datamodules:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(datamodules)}")
    datamodule = datamodules[dataset](root, download=False)
    datamodule.setup("test")
    images, labels = datamodule.test_set.tensors
    return to_model_range(images), labels

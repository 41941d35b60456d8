"""Feature extractors for FID/KID/IS: torch-fidelity's Inception-v3, and the project's own MNIST-like classifier.

Every extractor takes uint8 images (B, C, H, W) in [0, 255] (what a sampler's output becomes, and what a dataset
holds) and returns ``(features (B, D) float32, logits (B, K) float32 or None)``. ``name`` identifies the network
and its weights, and is part of the reference-statistics cache key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol
from unittest import mock

import torch
from torch import Tensor

#: torch-fidelity's Inception-v3 weights (the 2015-12-05 TF graph that defines FID), as torch.hub caches them
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights are neither on disk nor downloadable; the message says how to provide them."""


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]: ...


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The weights file: ``path`` if given, else torch.hub's cache (downloaded there when online)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"Inception weights file {str(p)!r} does not exist")
        return p
    p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not p.is_file():
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(p), progress=False)
        except Exception as err:  # offline: URLError, socket errors, HTTP errors...
            raise InceptionWeightsError(
                f"Inception-v3 weights not found at {p} and the download failed ({type(err).__name__}); "
                f"copy {INCEPTION_FILE} (from {INCEPTION_URL}) there, set TORCH_HOME, or pass inception_weights=PATH"
            ) from None
    return p


class InceptionExtractor(torch.nn.Module):
    """torch-fidelity's ``inception-v3-compat``: 2048-d pool features and the 1008 unbiased logits (for IS).

    Grayscale images are repeated to 3 channels; torch-fidelity resizes to 299x299 itself. The weights are loaded
    with ``weights_only=True`` (torch-fidelity's own loader would unpickle a given file unrestricted).
    """

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        import torch_fidelity.feature_extractor_inceptionv3 as fe

        path = inception_weights_path(weights_path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state):
            self.net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        self.name = f"inception-v3-compat-{_file_digest(path)}"

    @torch.inference_mode()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        features, logits = self.net(images.to(next(self.net.parameters()).device))
        return features.float(), logits.float()


class ClassifierExtractor(torch.nn.Module):
    """The project's small classifier (:mod:`ddpm_lightning.classifier`): penultimate features and logits.

    ``classifier`` is a shipped name (``mnist``, ``fashion_mnist``) or a path to a ClassifierModule checkpoint.
    """

    def __init__(self, classifier: str = "mnist") -> None:
        super().__init__()
        from ddpm_lightning.classifier import load_classifier

        self.net = load_classifier(classifier)
        digest = hashlib.sha256()
        for v in self.net.state_dict().values():
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        self.name = f"classifier-{Path(classifier).stem}-{digest.hexdigest()[:12]}"

    @torch.inference_mode()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        x = images.to(next(self.net.parameters()).device).float() / 127.5 - 1.0  # the diffusion data range
        features = self.net.features(x)  # (B, D) penultimate activations
        logits = self.net.net.head(features)  # (B, K); eval mode, so the head's dropout is the identity
        return features.float(), logits.float()


def build_extractor(kind: str, classifier: str = "mnist", inception_weights: str | None = None) -> torch.nn.Module:
    """An extractor by kind: ``classifier`` or ``inception``."""
    if kind == "classifier":
        return ClassifierExtractor(classifier)
    if kind == "inception":
        return InceptionExtractor(inception_weights)
    raise ValueError(f"unknown feature extractor {kind!r}; choose one of: classifier, inception")

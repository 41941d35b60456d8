"""A Lightning-free evaluator: generate N samples by index, extract features, score them against real data.

    from ddpm_lightning.metrics import Evaluator
    ev = Evaluator(num_samples=1000, sampling=SamplingConfig(num_steps=25, guidance_scale=3.0))
    results = ev.evaluate(model, datamodule)   # {"fid_classifier": ..., "kid_classifier": ..., "cond_acc": ...}

The :class:`~ddpm_lightning.callbacks.metrics.SampleMetrics` callback runs it at ``ddpm test`` (and, opt-in, during
``fit``); ``ddpm sweep`` and the experiments call it directly. Under DDP each rank generates its share of the
indices and ``gather`` brings the features together in index order, so the numbers do not depend on the world size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ddpm_lightning.data.base import SPLITS, ImageDataModule
from ddpm_lightning.metrics.background import background_mask, background_noise
from ddpm_lightning.metrics.evaluate import extract, generate, reference_stats
from ddpm_lightning.metrics.extractors import build_extractor
from ddpm_lightning.metrics.stats import FeatureStats, fid, inception_score, kid, precision_recall
from ddpm_lightning.sampling import SamplingConfig, choice_error

EXTRACTORS = ("classifier", "inception")
ExtractorName = Literal["classifier", "inception"]
#: images per KID subset at most (Binkowski et al. 2018 use 1,000); always fewer than N, so the std is a real spread
KID_SUBSET_SIZE = 1000


def kid_subset_size(n: int) -> int:
    """Subset size for KID over N generated images: at most :data:`KID_SUBSET_SIZE` and at most N // 2."""
    return max(2, min(KID_SUBSET_SIZE, n // 2))


def in_index_order(local: Tensor, n: int, world: int, gather: Callable[[Tensor], Tensor] | None) -> Tensor:
    """All ranks' rows in sample-index order. Rank r holds indices r, r + world, ... (padded to equal length)."""
    if world == 1 or gather is None:
        return local
    per_rank = math.ceil(n / world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    everything = gather(padded)  # (world, per_rank, ...)
    order = torch.arange(n)
    return everything[order % world, order // world]  # index i sits at rank i % world, row i // world


@dataclass
class Evaluator:
    """FID / KID / IS, precision / recall (k = 3, on the FID features) and, with the classifier, conditional accuracy
    of N samples against real data.

    Args:
        num_samples: N generated images (FID is biased upwards for small N: compare numbers at equal N).
        sampling: how to sample (:class:`~ddpm_lightning.sampling.SamplingConfig`).
        seed: sample i uses the generator seeded by (seed, i).
        batch_size: images per sampling batch on each rank.
        extractors: feature networks: ``classifier`` (the project's MNIST-like classifier: fast on CPU, also gives
            conditional accuracy) and/or ``inception`` (torch-fidelity's Inception-v3: the standard FID).
        classifier: shipped classifier name (``mnist``, ``fashion_mnist``) or a ClassifierModule checkpoint path.
        inception_weights: path of the Inception weights file (default: torch.hub's cache, downloaded if online).
        reference_split: real split the statistics are computed on (``train`` or ``test``).
        reference_num: real images in the reference statistics (default: ``num_samples``).
        cache_dir: where reference statistics are cached (default ``~/.cache/ddpm_lightning/reference_stats``).
        background: also score ``background_noise``: the mean intensity in [0, 1] of the samples at the positions
            black in >= 99.9 % of the whole reference split (:mod:`ddpm_lightning.metrics.background`).
    """

    num_samples: int = 1000
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    batch_size: int = 250
    extractors: list[str] = field(default_factory=lambda: ["classifier"])
    classifier: str = "mnist"
    inception_weights: str | None = None
    reference_split: str = "test"
    reference_num: int | None = None
    cache_dir: str | None = None
    background: bool = False
    _built: dict[str, torch.nn.Module] = field(default_factory=dict, init=False, repr=False)
    _masks: dict[tuple[int, str], Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sampling = SamplingConfig.of(self.sampling)
        self.extractors = list(self.extractors or ["classifier"])
        for kind in self.extractors:
            if kind not in EXTRACTORS:
                raise choice_error("feature extractor", kind, EXTRACTORS)
        if self.reference_split not in SPLITS:
            raise choice_error("reference_split", self.reference_split, SPLITS)
        if self.num_samples < 2 or self.batch_size < 1:
            raise ValueError("num_samples must be >= 2 and batch_size >= 1")
        self.reference_num = self.reference_num or self.num_samples

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that changes the numbers, as plain values (for JSON files and cache keys)."""
        return {
            "num_samples": self.num_samples,
            **self.sampling.to_dict(),
            "seed": self.seed,
            "reference_split": self.reference_split,
            "reference_num": self.reference_num,
            "extractors": self.extractors,
            "classifier": self.classifier,
            **({"background": True} if self.background else {}),  # only when on: older result keys stay valid
        }

    def extractor(self, kind: str, device: torch.device | str) -> torch.nn.Module:
        """The feature network ``kind`` (built once, then reused), in eval mode on ``device``."""
        if kind not in self._built:
            self._built[kind] = build_extractor(kind, self.classifier, self.inception_weights).eval()
        return self._built[kind].to(device)

    def extractor_names(self) -> dict[str, str]:
        """Full names (with weights) of the feature networks built so far."""
        return {kind: ex.name for kind, ex in self._built.items()}

    def reference(self, kind: str, datamodule: ImageDataModule, device: torch.device | str = "cpu") -> FeatureStats:
        """Statistics of the real reference images for extractor ``kind`` (cached on disk)."""
        ex = self.extractor(kind, device)
        return reference_stats(datamodule, self.reference_split, self.reference_num, ex, self.cache_dir)[0]

    def background_mask(self, datamodule: ImageDataModule) -> Tensor:
        """(C, H, W) bool: the background positions of the whole reference split (computed once per datamodule)."""
        key = (id(datamodule), self.reference_split)
        if key not in self._masks:
            real, _ = datamodule.real_images(self.reference_split)
            self._masks[key] = background_mask(real)
        return self._masks[key]

    def real_floor(self, datamodule: ImageDataModule, kind: str = "classifier", seed: int = 1) -> dict[str, float]:
        """FID/KID of N real *training* images against the reference: what a perfect model scores at this N (the
        finite-sample bias of FID), the floor to read every FID against."""
        ex = self.extractor(kind, "cpu")
        ref = self.reference(kind, datamodule)
        real, _ = datamodule.real_images("train", self.num_samples, seed=seed)
        feats, _ = extract(ex, real)
        k, _ = kid(feats, ref.features, subset_size=kid_subset_size(min(feats.shape[0], ref.num)))
        precision, recall = precision_recall(feats, ref.features)
        return {
            f"fid_{kind}": fid(FeatureStats.from_features(feats), ref),
            f"kid_{kind}": k,
            f"precision_{kind}": precision,
            f"recall_{kind}": recall,
        }

    @staticmethod
    def _gathered_mean(value: float, count: int, gather: Callable[[Tensor], Tensor] | None) -> float:
        if gather is None:
            return value
        both = gather(torch.tensor([value * count, float(count)], dtype=torch.float64)).reshape(-1, 2)  # (world, 2)
        return float(both[:, 0].sum() / both[:, 1].sum())

    def evaluate(
        self,
        model: Any,
        datamodule: ImageDataModule,
        rank: int = 0,
        world: int = 1,
        gather: Callable[[Tensor], Tensor] | None = None,
        progress: bool = False,
        sampling: SamplingConfig | None = None,
    ) -> dict[str, float]:
        """Generate this rank's share of the samples, extract features, gather them, and score against the data.

        ``model`` is a :class:`~ddpm_lightning.module.DiffusionModule` (anything with ``sample``, ``device``,
        ``conditional``, ``hparams.num_classes``); ``gather`` maps a (per_rank, ...) tensor to (world, per_rank, ...).
        ``sampling`` replaces :attr:`sampling` for this call: one evaluator (its feature networks built once) scores
        many sampling settings, as ``ddpm sweep`` does.
        """
        n, start = self.num_samples, time.perf_counter()
        sampling = self.sampling if sampling is None else SamplingConfig.of(sampling)
        indices = list(range(rank, n, world))
        images, labels = generate(
            model, indices, sampling=sampling, seed=self.seed, batch_size=self.batch_size, progress=progress
        )
        sample_seconds = time.perf_counter() - start

        def gathered(local: Tensor) -> Tensor:
            return in_index_order(local, n, world, gather)

        results: dict[str, float] = {}
        for kind in self.extractors:
            ex = self.extractor(kind, model.device)
            feats, logits = extract(ex, images)
            feats = gathered(feats)
            logits = gathered(logits) if logits is not None else None
            ref = self.reference(kind, datamodule, model.device)
            results[f"fid_{kind}"] = fid(FeatureStats.from_features(feats), ref)
            results[f"kid_{kind}"], results[f"kid_{kind}_std"] = kid(
                feats, ref.features, subset_size=kid_subset_size(min(n, ref.num))
            )
            results[f"precision_{kind}"], results[f"recall_{kind}"] = precision_recall(feats, ref.features)
            if logits is not None and n >= 10:
                results[f"is_{kind}"], results[f"is_{kind}_std"] = inception_score(logits)
            if kind == "classifier" and labels is not None and logits is not None:
                results["cond_acc"] = float((logits.argmax(1) == gathered(labels)).float().mean())
        if self.background:  # per rank on its own samples, then the mean over ranks (weighted by their counts)
            results["background_noise"] = self._gathered_mean(
                background_noise(images, self.background_mask(datamodule)), images.shape[0], gather
            )
        results["seconds"] = time.perf_counter() - start
        results["sample_seconds_per_1k"] = sample_seconds * 1000 / max(1, images.shape[0])
        results["nfe_per_sample"] = float(sampling.nfe(model.diffusion.num_timesteps, model.conditional))
        return results

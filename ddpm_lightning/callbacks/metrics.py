"""Sample-quality metrics: FID, KID, IS and conditional accuracy, at ``ddpm test`` and (opt-in) during training.

The CLI adds this callback under the ``metrics`` key: ``ddpm test --config X.yaml --ckpt_path C --metrics.num_samples
2000``. During ``fit`` it runs only when ``every_n_epochs`` is set: a metric never costs time silently. Each rank
generates its share of the N samples (sample i from its own seed, see :mod:`ddpm_lightning.metrics.evaluate`),
features are gathered, and rank zero writes a JSON with the numbers and everything needed to reproduce them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ddpm_lightning.callbacks.ema import ema_weights
from ddpm_lightning.metrics.evaluate import extract, generate, reference_stats
from ddpm_lightning.metrics.extractors import build_extractor
from ddpm_lightning.metrics.stats import FeatureStats, fid, inception_score, kid
from ddpm_lightning.samplers import SAMPLERS

EXTRACTORS = ("classifier", "inception")


def _in_index_order(local: Tensor, n: int, world: int, gather: Callable[[Tensor], Tensor] | None) -> Tensor:
    """All ranks' rows in sample-index order. Rank r holds indices r, r + world, ... (padded to equal length)."""
    if world == 1 or gather is None:
        return local
    per_rank = math.ceil(n / world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    everything = gather(padded)  # (world, per_rank, ...)
    order = torch.arange(n)
    return everything[order % world, order // world]  # index i sits at rank i % world, row i // world


class SampleMetrics(Callback):
    """Generate ``num_samples`` images with the (EMA) model and score them against real data.

    Args:
        num_samples: N generated images (FID is biased upwards for small N: compare numbers at equal N).
        sampler, num_steps, eta, guidance_scale: how to sample (see ``DiffusionModule.sample``).
        seed: sample i uses the generator seeded by (seed, i).
        batch_size: images per sampling batch on each rank.
        extractors: feature networks: ``classifier`` (the project's MNIST-like classifier: fast on CPU, also gives
            conditional accuracy) and/or ``inception`` (torch-fidelity's Inception-v3: the standard FID).
        classifier: shipped classifier name (``mnist``, ``fashion_mnist``) or a ClassifierModule checkpoint path.
        inception_weights: path of the Inception weights file (default: torch.hub's cache, downloaded if online).
        reference_split: real split the statistics are computed on (``train`` or ``test``).
        reference_num: real images in the reference statistics (default: ``num_samples``).
        every_n_epochs: also evaluate during ``fit`` every n epochs (``None``: only at ``ddpm test``).
        cache_dir: where reference statistics are cached (default ``~/.cache/ddpm_lightning/reference_stats``).
    """

    def __init__(
        self,
        num_samples: int = 1000,
        sampler: Literal["ddpm", "ddim"] = "ddim",
        num_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        seed: int = 0,
        batch_size: int = 250,
        extractors: list[Literal["classifier", "inception"]] | None = None,
        classifier: str = "mnist",
        inception_weights: str | None = None,
        reference_split: Literal["train", "test"] = "test",
        reference_num: int | None = None,
        every_n_epochs: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        extractors = list(extractors or ["classifier"])
        for kind in extractors:
            if kind not in EXTRACTORS:
                raise ValueError(f"unknown feature extractor {kind!r}; choose one of: {', '.join(EXTRACTORS)}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if reference_split not in ("train", "test"):
            raise ValueError(f"unknown reference_split {reference_split!r}; choose one of: train, test")
        if num_samples < 2 or batch_size < 1 or (every_n_epochs is not None and every_n_epochs < 1):
            raise ValueError("num_samples must be >= 2, batch_size >= 1 and every_n_epochs >= 1 (or null)")
        self.settings: dict[str, Any] = dict(
            num_samples=num_samples,
            sampler=sampler,
            num_steps=num_steps,
            eta=eta,
            guidance_scale=guidance_scale,
            seed=seed,
            reference_split=reference_split,
            reference_num=reference_num or num_samples,
            extractors=extractors,
            classifier=classifier,
        )
        self.batch_size = batch_size
        self.inception_weights = inception_weights
        self.every_n_epochs = every_n_epochs
        self.cache_dir = cache_dir
        self._extractors: dict[str, torch.nn.Module] = {}
        self.results: dict[str, float] = {}

    # -- hooks ---------------------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs is None or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            with ema_weights(trainer, pl_module):
                self.evaluate(trainer, pl_module, prefix="metrics")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = self.evaluate(trainer, pl_module, prefix="test")
        if trainer.is_global_zero:
            self._write_json(trainer, results)

    # -- the work ------------------------------------------------------------------------------------------------
    def _extractor(self, kind: str, device: torch.device) -> torch.nn.Module:
        if kind not in self._extractors:
            ex = build_extractor(kind, self.settings["classifier"], self.inception_weights)
            self._extractors[kind] = ex.to(device).eval()
        return self._extractors[kind]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> dict[str, float]:
        """Compute the metrics on every rank (features gathered), log them under ``prefix/``."""
        results = self.compute(
            pl_module,
            trainer.datamodule,
            rank=trainer.global_rank,
            world=trainer.world_size,
            gather=lambda t: pl_module.all_gather(t.to(pl_module.device)).cpu(),
            progress=trainer.is_global_zero,
        )
        for key, value in results.items():
            pl_module.log(f"{prefix}/{key}", value, rank_zero_only=True)
        n = self.settings["num_samples"]
        rank_zero_info(f"{prefix} metrics ({n} samples): " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results

    def compute(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        rank: int = 0,
        world: int = 1,
        gather: Callable[[Tensor], Tensor] | None = None,
        progress: bool = False,
    ) -> dict[str, float]:
        """Generate this rank's share of the samples, extract features, gather them, and score against the data.

        ``gather`` maps a (per_rank, ...) tensor to (world, per_rank, ...) (``LightningModule.all_gather``).
        """
        s, n = self.settings, self.settings["num_samples"]
        start = time.perf_counter()
        images, labels = generate(
            model,
            list(range(rank, n, world)),
            seed=s["seed"],
            batch_size=self.batch_size,
            sampler=s["sampler"],
            num_steps=s["num_steps"],
            eta=s["eta"],
            guidance_scale=s["guidance_scale"],
            progress=progress,
        )
        sample_seconds = time.perf_counter() - start

        def gathered(local: Tensor) -> Tensor:
            return _in_index_order(local, n, world, gather)

        results: dict[str, float] = {}
        for kind in s["extractors"]:
            extractor = self._extractor(kind, model.device)
            feats, logits = extract(extractor, images)
            feats = gathered(feats)
            logits = gathered(logits) if logits is not None else None
            ref, _, _ = reference_stats(datamodule, s["reference_split"], s["reference_num"], extractor, self.cache_dir)
            results[f"fid_{kind}"] = fid(FeatureStats.from_features(feats), ref)
            results[f"kid_{kind}"], results[f"kid_{kind}_std"] = kid(feats, ref.features)
            if logits is not None and n >= 10:
                results[f"is_{kind}"], results[f"is_{kind}_std"] = inception_score(logits)
            if kind == "classifier" and labels is not None and logits is not None:
                results["cond_acc"] = float((logits.argmax(1) == gathered(labels)).float().mean())
        results["seconds"] = time.perf_counter() - start
        results["sample_seconds_per_1k"] = sample_seconds * 1000 / max(1, images.shape[0])
        self.results = results
        return results

    def _write_json(self, trainer: L.Trainer, results: dict[str, float]) -> Path | None:
        s = self.settings
        ckpt = getattr(trainer, "ckpt_path", None)
        folder = Path(ckpt).parent if ckpt else Path(trainer.log_dir or ".")
        stem = Path(ckpt).stem if ckpt else "model"
        tag = f"{s['sampler']}{s['num_steps']}-w{s['guidance_scale']:g}-n{s['num_samples']}-seed{s['seed']}"
        path = folder / f"{stem}.metrics.{tag}.json"
        dm = trainer.datamodule
        payload = {
            "results": results,
            "settings": {**s, "dataset": type(dm).__name__, "image_size": dm.image_size},
            "extractors": {k: ex.name for k, ex in self._extractors.items()},
            "checkpoint": str(ckpt) if ckpt else None,
            "world_size": trainer.world_size,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        rank_zero_info(f"metrics written to {path}")
        self.json_path = path
        return path

"""Generation by sample index, feature extraction, and cached reference statistics.

Sample ``i`` of an evaluation is drawn from its own generator seeded by ``(seed, i)`` and, for a conditional model,
asks for class ``i % num_classes``: the set of N samples is the same whatever the batch size or the number of
DDP ranks that share the work.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from tqdm.auto import tqdm

from ddpm_lightning.checkpointing import atomic_save
from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.images import to_uint8
from ddpm_lightning.metrics.stats import FeatureStats
from ddpm_lightning.sampling import SamplingConfig


def sample_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """The generator of sample ``index`` of an evaluation with ``seed`` (independent streams per index).

    The pair is hashed to 32 bits: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed.
    """
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:4], "little"))


def class_of(indices: Sequence[int], num_classes: int) -> Tensor:
    """Requested class of each sample index: balanced, ``i % num_classes``."""
    return torch.as_tensor([i % num_classes for i in indices], dtype=torch.long)


def generate(
    model: Any,
    indices: Sequence[int],
    *,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int = 250,
    labels: Sequence[int] | None = None,
    progress: bool = False,
    **changes: Any,
) -> tuple[Tensor, Tensor | None]:
    """uint8 samples (n, C, H, W) for the given sample indices, and their requested labels (n,) or None.

    ``sampling`` (default: the model's own) with the fields in ``changes`` overridden says how to sample."""
    config = SamplingConfig.of(sampling if sampling is not None else model.sampling, **changes)
    if labels is None and model.conditional:
        labels_t = class_of(indices, model.hparams.num_classes)
    else:
        labels_t = torch.as_tensor(labels, dtype=torch.long) if labels is not None else None
    out = []
    chunks = range(0, len(indices), batch_size)
    for start in tqdm(chunks, desc="sampling", disable=not progress):
        idx = list(indices[start : start + batch_size])
        gens = [sample_generator(seed, i, model.device) for i in idx]
        y = labels_t[start : start + batch_size] if labels_t is not None else None
        x = model.sample(len(idx), labels=y, sampling=config, generator=gens)
        out.append(to_uint8(x).cpu())
    images = torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)
    return images, labels_t


def extract(extractor: torch.nn.Module, images: Tensor, batch_size: int = 200) -> tuple[Tensor, Tensor | None]:
    """Features (N, D) and logits (N, K) or None of uint8 images, in batches."""
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        f, lg = extractor(images[start : start + batch_size])
        feats.append(f.cpu())
        if lg is not None:
            logits.append(lg.cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm_lightning" / "reference_stats"


def reference_stats(
    datamodule: ImageDataModule,
    split: str,
    num: int,
    extractor: torch.nn.Module,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> tuple[FeatureStats, Tensor | None, Path]:
    """Features of the real data, computed once and cached on disk, keyed by everything that changes them."""
    key = {
        "dataset": type(datamodule).__name__,
        "split": split,
        "image_size": datamodule.image_size,
        "channels": datamodule.channels,
        "num": num,
        "seed": seed,
        "extractor": extractor.name,
        **datamodule.reference_key(split),  # e.g. a Hugging Face dataset's fingerprint: changed data, new statistics
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{key['dataset']}-{split}-{key['image_size']}px-n{num}-{extractor.name.split('-')[0]}-{digest}.pt"
    path = Path(cache_dir or default_cache_dir()) / name
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") == key:
            rank_zero_info(f"reference statistics reused from {path}")
            return FeatureStats.from_dict(blob["stats"]), blob.get("logits"), path
    images, _ = datamodule.real_images(split, num, seed)
    features, logits = extract(extractor, images)
    stats = FeatureStats.from_features(features)
    # every rank of a DDP job computes the same statistics and writes them: each through its own temporary file
    atomic_save({"key": key, "stats": stats.to_dict(), "logits": logits}, path)
    rank_zero_info(f"reference statistics computed ({stats.num} images) and cached at {path}")
    return stats, logits, path

"""Sample-quality metrics: feature extractors, FID/KID/IS statistics, generation by index, cached references, and the
Lightning-free :class:`Evaluator` that puts them together."""

from ddpm_lightning.metrics.evaluator import Evaluator
from ddpm_lightning.metrics.extractors import ClassifierExtractor, InceptionExtractor, build_extractor
from ddpm_lightning.metrics.stats import FeatureStats, fid, frechet_distance, inception_score, kid

__all__ = [
    "ClassifierExtractor",
    "Evaluator",
    "FeatureStats",
    "InceptionExtractor",
    "build_extractor",
    "fid",
    "frechet_distance",
    "inception_score",
    "kid",
]

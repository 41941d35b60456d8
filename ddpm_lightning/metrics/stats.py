"""Sample-quality statistics on feature vectors: FID, KID and Inception Score, in float64.

* FID (Heusel et al. 2017): ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`` between Gaussians fitted to
  the features. ``tr((S_1 S_2)^{1/2})`` is the sum of the square roots of the eigenvalues of ``S_1 S_2`` (real and
  non-negative for covariance matrices, up to rounding), which avoids scipy's ``sqrtm`` and its complex parts.
* KID (Binkowski et al. 2018): unbiased MMD^2 with the polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged
  over random subsets (torch-fidelity's defaults: 100 subsets of 1,000), seeded.
* Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` splits; mean and std.
* Precision and recall (Kynkäänniemi et al. 2019, k = 3): the share of generated features inside the real data's
  k-NN manifold (quality), and of real features inside the generated one (coverage); torch-fidelity's ``prc``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D) of N feature vectors, float64, plus the features themselves for KID."""

    mu: Tensor
    sigma: Tensor
    features: Tensor  # (N, D) float32

    @classmethod
    def from_features(cls, features: Tensor) -> FeatureStats:
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need (N >= 2, D) features, got {tuple(features.shape)}")
        f = features.double()
        mu = f.mean(0)
        centred = f - mu
        sigma = centred.T @ centred / (f.shape[0] - 1)  # unbiased, as numpy.cov
        return cls(mu=mu, sigma=sigma, features=features.float())

    @property
    def num(self) -> int:
        return self.features.shape[0]

    def to_dict(self) -> dict[str, Tensor]:
        return {"mu": self.mu, "sigma": self.sigma, "features": self.features}

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> FeatureStats:
        return cls(mu=d["mu"], sigma=d["sigma"], features=d["features"])


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula), computed in float64."""
    mu1, mu2, sigma1, sigma2 = (a.double() for a in (mu1, mu2, sigma1, sigma2))
    diff = mu1 - mu2
    eigvals = torch.linalg.eigvals(sigma1 @ sigma2)  # complex; real >= 0 up to rounding
    tr_sqrt = eigvals.real.clamp(min=0).sqrt().sum()
    return float(diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt)


def fid(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def kid(a: Tensor, b: Tensor, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance between features a (N, D) and b (M, D): (mean, std) over subsets."""
    n = min(a.shape[0], b.shape[0], subset_size)
    if n < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    gen = torch.Generator().manual_seed(seed)
    a, b = a.double(), b.double()
    d = a.shape[1]
    values = []
    for _ in range(num_subsets):
        x = a[torch.randperm(a.shape[0], generator=gen)[:n]]
        y = b[torch.randperm(b.shape[0], generator=gen)[:n]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = 1 - torch.eye(n, dtype=torch.float64)
        mmd = (kxx * off).sum() / (n * (n - 1)) + (kyy * off).sum() / (n * (n - 1)) - 2 * kxy.mean()
        values.append(mmd)
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=False)) if len(values) > 1 else 0.0


#: the k-th nearest neighbour whose distance is each feature's ball radius (Kynkäänniemi et al. 2019, Sec. 3: k = 3)
PRC_NEIGHBORHOOD = 3
#: rows per pairwise-distance block: memory (N x block floats) rather than N x N at 10k samples
PRC_BATCH_SIZE = 1000


def precision_recall(generated: Tensor, real: Tensor, neighborhood: int = PRC_NEIGHBORHOOD) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated features (N, D) against real ones
    (M, D), through torch-fidelity's ``prc_features_to_metric`` (its "part" variant, blockwise, same numbers).

    Precision: the fraction of generated samples within the k-NN radius of some real sample; recall: the fraction of
    real samples within the k-NN radius of some generated sample. Both in [0, 1]; real against real gives ~1 / ~1,
    one mode only gives high precision and low recall.
    """
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    if min(generated.shape[0], real.shape[0]) <= neighborhood:
        raise ValueError(f"precision/recall with k = {neighborhood} need more than {neighborhood} samples per side")
    out = prc_features_to_metric(
        generated.float(), real.float(), prc_neighborhood=neighborhood, prc_batch_size=PRC_BATCH_SIZE,
        save_cpu_ram=True, verbose=False,
    )  # fmt: skip
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score from class logits (N, K): (mean, std) over ``splits`` consecutive splits."""
    if logits.shape[0] < splits:
        raise ValueError(f"need at least {splits} samples for {splits} splits, got {logits.shape[0]}")
    log_p = torch.log_softmax(logits.double(), dim=1)  # (N, K)
    scores = []
    for part in log_p.chunk(splits):
        log_py = torch.logsumexp(part, dim=0) - torch.log(torch.tensor(float(part.shape[0]), dtype=torch.float64))
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))

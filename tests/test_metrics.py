"""FID / KID / IS against closed forms and scipy; reference-statistics cache; seeded, rank-independent evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm_lightning.metrics import evaluate as ev
from ddpm_lightning.metrics.stats import FeatureStats, fid, frechet_distance, inception_score, kid, precision_recall


def test_frechet_distance_closed_form_diagonal():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()  # = 5 + 1 + 1 + 4
    assert frechet_distance(mu1, a.diag(), mu2, b.diag()) == pytest.approx(float(expected), abs=1e-10)
    assert float(expected) == 11.0


def test_frechet_distance_matches_scipy_on_random_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    b = rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    got = frechet_distance(*(torch.from_numpy(v) for v in (m1, s1, m2, s2)))
    assert got == pytest.approx(expected, rel=1e-9)


def test_feature_stats_are_numpy_mean_and_cov():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    st = FeatureStats.from_features(x)
    np.testing.assert_allclose(st.mu.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-10)
    same = FeatureStats.from_features(x)
    assert fid(st, same) == pytest.approx(0.0, abs=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same, same_std = kid(x, y, num_subsets=20, subset_size=200)
    small, _ = kid(x, y + 0.25, num_subsets=20, subset_size=200)
    shifted, _ = kid(x, y + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 2 * same_std  # unbiased: zero within its own spread (0.012 +- 0.013 measured)
    assert 0.1 < small < shifted and shifted > 5  # monotone in the shift (0.24 and 7.5 measured)
    assert kid(x, y, num_subsets=5, subset_size=100, seed=3) == kid(x, y, num_subsets=5, subset_size=100, seed=3)


def test_inception_score_extremes_with_a_stand_in_network():
    # a stand-in "classifier" whose logits are one-hot over K=10 classes, balanced: IS = K; all one class: IS = 1
    k = 10
    confident_balanced = torch.eye(k).repeat(20, 1) * 50.0  # (200, 10)
    mean, std = inception_score(confident_balanced, splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    one_class = torch.zeros(200, k)
    one_class[:, 3] = 50.0
    assert inception_score(one_class, splits=10)[0] == pytest.approx(1.0, abs=1e-6)
    uniform = torch.zeros(200, k)  # p(y|x) uniform: no information, IS = 1
    assert inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-9)


class _MeanExtractor(torch.nn.Module):
    """A stand-in extractor: per-channel mean and std of the image (cheap and deterministic)."""

    name = "stand-in"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        x = images.float() / 255
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1), None


def test_reference_stats_cached_reused_and_invalidated(shared_data, tmp_path):
    from ddpm_lightning.data import FashionMNISTDataModule, MNISTDataModule

    dm = MNISTDataModule(root=str(shared_data), download=False)
    ex = _MeanExtractor()
    a, _, path = ev.reference_stats(dm, "test", 300, ex, tmp_path)
    calls = ex.calls
    b, _, path_b = ev.reference_stats(dm, "test", 300, ex, tmp_path)
    assert ex.calls == calls and path_b == path  # reused, not recomputed
    torch.testing.assert_close(a.mu, b.mu)
    # every key that changes the numbers gives a new entry
    c, _, path_c = ev.reference_stats(dm, "test", 200, ex, tmp_path)
    d, _, path_d = ev.reference_stats(dm, "train", 300, ex, tmp_path)
    e, _, path_e = ev.reference_stats(
        FashionMNISTDataModule(root=str(shared_data), download=False), "test", 300, ex, tmp_path
    )
    assert len({path, path_c, path_d, path_e}) == 4 and ex.calls > calls
    assert abs(e.mu[0] - a.mu[0]) > 0.05  # Fashion-MNIST is brighter than MNIST (0.286 vs 0.131 mean pixel)
    # a stale file whose stored key does not match is never reused
    blob = torch.load(path, weights_only=True)
    blob["key"]["num"] = 999
    torch.save(blob, path)
    before = ex.calls
    ev.reference_stats(dm, "test", 300, ex, tmp_path)
    assert ex.calls > before


def test_generation_is_per_index_and_batch_independent():
    from ddpm_lightning.module import DiffusionModule

    model = DiffusionModule(
        in_channels=1,
        image_size=8,
        num_classes=3,
        conditional=True,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        num_groups=4,
        num_timesteps=20,
    )
    with torch.no_grad():
        model.net.conv_out.weight.normal_(0, 0.1)  # a non-trivial network
    full, labels = ev.generate(model, list(range(6)), seed=5, batch_size=4, num_steps=4, eta=1.0)
    part, part_labels = ev.generate(model, [1, 3, 5], seed=5, batch_size=2, num_steps=4, eta=1.0)
    assert full.dtype == torch.uint8 and full.shape == (6, 1, 8, 8)
    assert torch.equal(full[1::2], part) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    other, _ = ev.generate(model, [1, 3, 5], seed=6, batch_size=2, num_steps=4, eta=1.0)
    assert not torch.equal(other, part)


def test_bad_choices():
    from ddpm_lightning.callbacks.metrics import SampleMetrics
    from ddpm_lightning.metrics.extractors import build_extractor

    with pytest.raises(ValueError, match="classifier, inception"):
        SampleMetrics(extractors=["vgg"])
    with pytest.raises(ValueError, match="classifier, inception"):
        build_extractor("vgg")
    with pytest.raises(ValueError, match="train, test"):
        SampleMetrics(reference_split="val")


def test_missing_inception_weights_is_a_clear_error(tmp_path, monkeypatch):
    from ddpm_lightning.metrics import extractors

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(extractors.InceptionWeightsError) as err:
        extractors.InceptionExtractor()
    msg = str(err.value)
    assert "\n" not in msg and extractors.INCEPTION_FILE in msg and "inception_weights=PATH" in msg
    with pytest.raises(extractors.InceptionWeightsError, match="does not exist"):
        extractors.InceptionExtractor(tmp_path / "nope.pth")


def test_precision_recall_by_hand_on_a_line():
    """k = 3 balls on 1-D points, by hand: the radius of a point is the distance to its 3rd nearest neighbour."""
    real = torch.arange(10.0)[:, None]
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100
    assert precision_recall(far, real) == (0.0, 0.0)
    # generated on 0..4 only: every sample is real-like (precision 1); its balls (radius 3 at 0 and 4, 2 inside)
    # reach up to 4 + 3 = 7: real 0..7 covered, 8 and 9 not (recall 0.8)
    assert precision_recall(real[:5], real) == pytest.approx((1.0, 0.8))
    with pytest.raises(ValueError, match="need more than 3 samples"):
        precision_recall(real[:3], real)


def test_precision_recall_of_real_digits_and_of_one_class(shared_data):
    """On the classifier's features (those of FID): real test digits against other real digits score near 1 / 1;
    one class only (a mode-dropped "model") keeps precision and loses recall (about a tenth of the classes)."""
    from ddpm_lightning.data import MNISTDataModule
    from ddpm_lightning.metrics.extractors import build_extractor

    dm = MNISTDataModule(root=str(shared_data), download=False)
    ex = build_extractor("classifier", "mnist", None).eval()
    reference, _ = dm.real_images("test", 500, seed=0)
    train, labels = dm.real_images("train", 5000, seed=1)
    with torch.no_grad():
        ref, _ = ev.extract(ex, reference)
        other, _ = ev.extract(ex, train[:500])
        threes, _ = ev.extract(ex, train[labels == 3][:400])
    precision, recall = precision_recall(other, ref)
    assert precision > 0.85 and recall > 0.85, (precision, recall)
    precision, recall = precision_recall(threes, ref)
    assert precision > 0.85 and recall < 0.3, (precision, recall)

"""Fidelity statistics (FID, Inception Score, precision/recall) against independent computations and
constructed cases whose answer is known in closed form."""
import numpy as np
import pytest
import scipy.linalg
from scipy.special import softmax

from flexdit.errors import FlexDiTError
from flexdit.measure.fidelity import feature_statistics, frechet_distance, inception_score, precision_recall
from flexdit.measure.memory import LiveTensorBytes


def gaussian_features(seed: int, n: int = 200, d: int = 16, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift + rng.normal(size=d)


# --- FID -----------------------------------------------------------------------------------------------
def test_feature_statistics_are_mean_and_unbiased_covariance():
    x = gaussian_features(0, n=50, d=5)
    mu, sigma = feature_statistics(x)
    centred = x - x.sum(axis=0) / len(x)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, x.sum(axis=0) / len(x), rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1), rtol=1e-12)
    assert feature_statistics(x[:, :1])[1].shape == (1, 1)


def test_frechet_matches_direct_scipy():
    (mu1, s1), (mu2, s2) = feature_statistics(gaussian_features(1)), feature_statistics(gaussian_features(2, shift=0.5))
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_equal_commuting_covariances_leave_the_mean_term():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    diagonal = np.diag(rng.uniform(0.5, 2.0, size=8))
    a = rng.normal(size=(8, 8))
    full = a @ a.T + np.eye(8)  # commutes with itself: sqrt(S S) = S
    for sigma in (diagonal, full):
        assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_frechet_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 3.0, size=10), rng.uniform(0.1, 3.0, size=10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_of_singular_covariances_is_finite():
    (mu1, s1), (mu2, s2) = feature_statistics(gaussian_features(5, n=10, d=32)), feature_statistics(
        gaussian_features(6, n=12, d=32))
    assert np.linalg.matrix_rank(s1) < 32
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0


def test_frechet_retries_with_eps_when_sqrtm_fails(monkeypatch):
    (mu1, s1), (mu2, s2) = feature_statistics(gaussian_features(7, d=4)), feature_statistics(gaussian_features(8, d=4))
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def failing_once(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    value = frechet_distance(mu1, s1, mu2, s2, eps=1e-2)
    offset = 1e-2 * np.eye(4)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) \
        - 2 * np.trace(real_sqrtm((s1 + offset) @ (s2 + offset))).real
    assert len(calls) == 2 and value == pytest.approx(expected, rel=1e-10)


def test_frechet_errors():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(FlexDiTError, match="3 and 4 features"):
        frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(FlexDiTError, match="mu1 has shape"):
        frechet_distance(np.zeros((3, 1)), sigma, mu, sigma)
    with pytest.raises(FlexDiTError, match="sigma2 has shape"):
        frechet_distance(mu, sigma, mu, np.eye(4))
    with pytest.raises(FlexDiTError, match="NaN"):
        frechet_distance(mu, sigma, mu, np.full((3, 3), np.nan))
    with pytest.raises(FlexDiTError, match="ill-conditioned"):  # sqrt of a negative eigenvalue, eps or not
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(FlexDiTError, match="at least 2 samples"):
        feature_statistics(np.ones((1, 3)))
    with pytest.raises(FlexDiTError, match="expected \\(samples, features\\)"):
        feature_statistics(np.ones(3))
    with pytest.raises(FlexDiTError, match="NaN"):
        feature_statistics(np.array([[0.0, 1.0], [np.nan, 2.0]]))


# --- Inception Score -----------------------------------------------------------------------------------
def direct_inception_score(p: np.ndarray) -> float:
    marginal = p.mean(axis=0)
    return float(np.exp(np.mean(np.sum(p * np.log(p / marginal), axis=1))))


def confident_logits(labels: np.ndarray, classes: int) -> np.ndarray:
    return 50.0 * np.eye(classes)[labels]  # softmax puts exp(-50) on the other classes


def test_inception_score_of_constructed_predictions():
    labels = np.arange(1000) % 10
    mean, std = inception_score(confident_logits(labels, 10))
    assert mean == pytest.approx(10.0, rel=1e-6) and std == 0.0
    assert inception_score(confident_logits(np.full(1000, 3), 10))[0] == pytest.approx(1.0, rel=1e-9)
    assert inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0, rel=1e-12)  # uniform predictions


def test_inception_score_matches_direct_numpy():
    rng = np.random.default_rng(9)
    probs = rng.dirichlet(np.full(7, 0.3), size=300)
    assert inception_score(probs, from_logits=False)[0] == pytest.approx(direct_inception_score(probs), rel=1e-10)
    logits = 3.0 * rng.normal(size=(300, 7)) + 1e4  # a large common offset: the softmax must not overflow
    assert inception_score(logits)[0] == pytest.approx(direct_inception_score(softmax(logits - 1e4, axis=1)),
                                                       rel=1e-10)


def test_inception_score_splits_into_consecutive_chunks():
    logits = np.concatenate([confident_logits(np.arange(40) % 4, 4), confident_logits(np.zeros(40, int), 4)])
    mean, std = inception_score(logits, split_size=40)  # chunk scores 4 and 1
    assert mean == pytest.approx(2.5, rel=1e-6) and std == pytest.approx(1.5, rel=1e-6)
    p = np.random.default_rng(10).dirichlet(np.ones(5), size=12000)
    scores = [direct_inception_score(p[i:i + 5000]) for i in (0, 5000, 10000)]  # the last chunk has 2000
    mean, std = inception_score(p, from_logits=False)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-8)


def test_inception_score_errors():
    with pytest.raises(FlexDiTError, match="split_size"):
        inception_score(np.zeros((4, 3)), split_size=0)
    with pytest.raises(FlexDiTError, match="expected \\(samples, features\\)"):
        inception_score(np.zeros(3))
    with pytest.raises(FlexDiTError, match="need at least 1 sample and"):
        inception_score(np.zeros((0, 3)))
    with pytest.raises(FlexDiTError, match="NaN"):
        inception_score(np.array([[0.0, np.nan]]))
    with pytest.raises(FlexDiTError, match="non-negative"):
        inception_score(np.array([[1.5, -0.5]]), from_logits=False)
    with pytest.raises(FlexDiTError, match="summing to 1"):
        inception_score(np.array([[0.5, 0.6]]), from_logits=False)


# --- precision / recall --------------------------------------------------------------------------------
def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Euclidean distances from explicit differences, self excluded by index."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    cross = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # (real, fake)
    precision = np.mean((cross <= radii(real)[:, None]).any(axis=0))
    recall = np.mean((cross <= radii(fake)[None]).any(axis=1))
    return float(precision), float(recall)


def test_precision_recall_by_hand_in_1d():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii all 1; k=2 radii 2, 1, 1, 2
    fake = np.array([[-1.0], [1.5], [1.75], [4.0], [4.5], [10.0]])  # k=1 radii 2.5, .25, .25, .5, .5, 5.5
    # precision: -1 and 4 lie on the balls' boundaries (included), 4.5 and 10 outside; recall: 0 and 1 in the
    # ball of -1, 2 on the boundary of 1.75's, 3 in none.
    assert precision_recall(real, fake, k=1) == (4 / 6, 3 / 4)
    assert precision_recall(real, fake, k=2) == (5 / 6, 1.0)  # 4.5 within 1.5 of 3 (radius 2); 3 within 2.5 of 1.5


def test_precision_recall_of_constructed_sets():
    rng = np.random.default_rng(11)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    cloud = rng.normal(size=(500, 2))
    precision, recall = precision_recall(cloud, 0.01 * rng.normal(size=(100, 2)))  # a tight cluster at the centre
    assert precision == 1.0 and recall < 0.05


def test_precision_recall_matches_brute_force_and_batching():
    rng = np.random.default_rng(12)
    real, fake = rng.normal(size=(150, 8)), rng.normal(size=(120, 8)) * 1.3 + 0.4
    real[10] = real[20]  # a duplicate: its own copy is its nearest neighbour at 0, itself is not
    for k in (1, 3, 5):
        expected = brute_precision_recall(real, fake, k)
        assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
        for batch_size in (1, 64, 10000):
            assert precision_recall(real, fake, k=k, batch_size=batch_size) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_never_builds_the_full_distance_matrix():
    rng = np.random.default_rng(13)
    real, fake = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    with LiveTensorBytes() as live:
        precision_recall(real, fake, batch_size=40)
    # one (40, 400) float32 block, its boolean mask, the float32 inputs: less than two blocks (full matrix: ten)
    assert live.peak < 2 * 40 * 400 * 4


def test_precision_recall_errors():
    real, fake = np.zeros((5, 3)), np.ones((4, 3))
    with pytest.raises(FlexDiTError, match="real has shape"):
        precision_recall(np.zeros(5), fake)
    with pytest.raises(FlexDiTError, match="fake has shape"):
        precision_recall(real, np.zeros((0, 3)))
    with pytest.raises(FlexDiTError, match="NaN"):
        precision_recall(real, np.full((4, 3), np.nan))
    with pytest.raises(FlexDiTError, match="3 features and fake 2"):
        precision_recall(real, np.ones((4, 2)))
    with pytest.raises(FlexDiTError, match="k = 4"):
        precision_recall(real, fake, k=4)
    with pytest.raises(FlexDiTError, match="k = 0"):
        precision_recall(real, fake, k=0)
    with pytest.raises(FlexDiTError, match="batch_size"):
        precision_recall(real, fake, batch_size=0)

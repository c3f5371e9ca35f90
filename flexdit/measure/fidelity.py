"""The statistics of the ADM evaluator (guided-diffusion evaluations/evaluator.py), which the DiT family
reports: FID (and sFID, the same distance on spatial features), Inception Score, improved precision and
recall. They act on features already extracted by an Inception network, so they are plain mathematics,
testable without the network; written from the definitions, with ADM's choices where it makes one:

- FID: mean and covariance with np.cov's unbiased estimate; sqrt(S1 S2) by scipy.linalg.sqrtm, retried with
  eps * I added to both covariances when it fails (as pytorch-fid and ADM do).
- Inception Score: exp(E_x KL(p(y|x) || p(y))) on consecutive chunks of 5000 samples (ADM's split_size;
  10 splits for the usual 50k samples, as improved-gan's splits=10); the last chunk may be smaller.
- Precision/recall (Kynkaenniemi et al. 2019): ADM's ManifoldEstimator as the evaluator builds it, one
  neighbourhood size k = 3 and no percentile clamping of the radii. Distances are float32, where ADM first
  tries float16.
"""
import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy

from flexdit.errors import FlexDiTError

IMAGINARY_TOLERANCE = 1e-3  # largest imaginary part of diag(sqrt(S1 S2)) put down to round-off (ADM's)
PROBABILITY_TOLERANCE = 1e-3  # how far from 1 a row of probabilities may sum (float32 softmax over ~1000 classes)


def _features(name: str, x: np.ndarray, min_rows: int = 1) -> np.ndarray:
    """A (N, D) float array with N >= min_rows, finite, or a FlexDiTError naming the argument."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise FlexDiTError(f"{name} has shape {x.shape}; expected (samples, features)")
    if x.shape[0] < min_rows or x.shape[1] == 0:
        raise FlexDiTError(f"{name} has shape {x.shape}; need at least {min_rows} sample{'s' * (min_rows > 1)} "
                           "and 1 feature")
    if not np.isfinite(x).all():
        raise FlexDiTError(f"{name} contains NaN or infinite values; check the feature extraction")
    return x


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64: the FID statistics."""
    x = _features("features", features, min_rows=2).astype(np.float64)
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))  # atleast_2d: np.cov gives a scalar for D = 1


def _sqrtm_trace(product: np.ndarray) -> float | None:
    """Tr(sqrt(product)), or None when sqrtm fails: non-finite entries, or an imaginary diagonal beyond round-off."""
    root = linalg.sqrtm(product)
    if not np.isfinite(root).all():
        return None
    diagonal = np.diagonal(root)
    if np.iscomplexobj(diagonal):
        if np.abs(diagonal.imag).max() > IMAGINARY_TOLERANCE:
            return None
        diagonal = diagonal.real
    return float(diagonal.sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)): the Frechet distance of two Gaussians (FID on Inception
    pool features). When sqrtm fails on the product, which a singular one (fewer samples than features) can
    cause, eps * I is added to both covariances and it is retried; ADM retries only on non-finite roots and
    raises on imaginary ones, here both get the retry and only a second failure raises."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    for name, mu, sigma in (("1", mu1, sigma1), ("2", mu2, sigma2)):
        if mu.ndim != 1 or mu.shape[0] == 0:
            raise FlexDiTError(f"mu{name} has shape {mu.shape}; expected a vector of feature means")
        if sigma.shape != (mu.shape[0], mu.shape[0]):
            raise FlexDiTError(f"sigma{name} has shape {sigma.shape}; expected ({mu.shape[0]}, {mu.shape[0]}) "
                               f"to match mu{name}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise FlexDiTError(f"mu{name} or sigma{name} contains NaN or infinite values; recompute the statistics")
    if mu1.shape != mu2.shape:
        raise FlexDiTError(f"the statistics have {mu1.shape[0]} and {mu2.shape[0]} features; compute both with "
                           "the same feature extractor")
    trace_root = _sqrtm_trace(sigma1 @ sigma2)
    if trace_root is None:
        offset = eps * np.eye(mu1.shape[0])
        trace_root = _sqrtm_trace((sigma1 + offset) @ (sigma2 + offset))
    if trace_root is None:
        raise FlexDiTError("covariances too ill-conditioned for a real matrix square root, even with eps on the "
                           "diagonal; use more samples than feature dimensions or check the statistics")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def _probabilities(x: np.ndarray, from_logits: bool) -> np.ndarray:
    x = _features("logits" if from_logits else "probabilities", x).astype(np.float64)
    if from_logits:
        x = np.exp(x - x.max(axis=1, keepdims=True))  # shifted: the largest logit maps to exp(0)
        return x / x.sum(axis=1, keepdims=True)
    if (x < 0).any() or not np.allclose(x.sum(axis=1), 1.0, rtol=0.0, atol=PROBABILITY_TOLERANCE):
        raise FlexDiTError("probabilities must be non-negative with rows summing to 1; pass logits with "
                           "from_logits=True")
    return x


def inception_score(logits_or_probs: np.ndarray, split_size: int = 5000,
                    from_logits: bool = True) -> tuple[float, float]:
    """Mean and (population) standard deviation over consecutive chunks of split_size samples of
    exp(E_x KL(p(y|x) || p(y))), p(y) the chunk's mean prediction. Chunks rather than a number of splits
    because that is ADM's definition (split_size=5000); 0 log 0 counts as 0."""
    if split_size < 1:
        raise FlexDiTError(f"split_size must be at least 1, got {split_size}")
    p = _probabilities(logits_or_probs, from_logits)  # (N, classes)
    scores = []
    for start in range(0, p.shape[0], split_size):
        part = p[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)  # (1, classes)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)  # (chunk,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances, ||a||^2 - 2 a.b + ||b||^2 clamped at 0, built in place
    so that the block is the only large tensor."""
    d = a @ b.T
    return d.mul_(-2.0).add_(a.square().sum(1, keepdim=True)).add_(b_sq).clamp_min_(0.0)


def _radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point (N,). ADM takes the (k+1)-th smallest
    with the point's own zero distance in the row; excluding the point itself gives the same value."""
    x_sq = x.square().sum(1)
    radii = torch.empty(x.shape[0], dtype=x.dtype)
    for start in range(0, x.shape[0], batch_size):
        end = min(start + batch_size, x.shape[0])
        d = _squared_distances(x[start:end], x, x_sq)  # (batch, N)
        d[torch.arange(end - start), torch.arange(start, end)] = float("inf")
        radii[start:end] = d.topk(k, dim=1, largest=False).values[:, -1]  # topk: no copy of the block, unlike kthvalue
        del d  # freed before the next block is built, not after
    return radii


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision (fraction of fake features inside some real feature's k-NN ball) and recall (real
    features inside some fake ball), ball radius = distance to the k-th nearest other point of its own set,
    boundary included. Distances are compared squared (same sets) in float32 blocks of at most
    batch_size x N, which bounds the memory: 10000 x 50000 is 2 GB."""
    real = _features("real", real)
    fake = _features("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise FlexDiTError(f"real has {real.shape[1]} features and fake {fake.shape[1]}; extract both with the "
                           "same network")
    if k < 1 or k >= min(real.shape[0], fake.shape[0]):
        raise FlexDiTError(f"k = {k} needs 1 <= k < the number of points in each set ({real.shape[0]} real, "
                           f"{fake.shape[0]} fake); lower k or add samples")
    if batch_size < 1:
        raise FlexDiTError(f"batch_size must be at least 1, got {batch_size}")
    r = torch.from_numpy(np.ascontiguousarray(real, dtype=np.float32))
    f = torch.from_numpy(np.ascontiguousarray(fake, dtype=np.float32))
    r_radii, f_radii = _radii(r, k, batch_size), _radii(f, k, batch_size)
    f_sq = f.square().sum(1)
    fake_in = torch.zeros(f.shape[0], dtype=torch.bool)  # inside the real manifold: precision
    real_in = torch.zeros(r.shape[0], dtype=torch.bool)  # inside the fake manifold: recall
    for start in range(0, r.shape[0], batch_size):
        end = min(start + batch_size, r.shape[0])
        d = _squared_distances(r[start:end], f, f_sq)  # (batch, N_fake)
        real_in[start:end] = (d <= f_radii).any(dim=1)
        fake_in |= (d <= r_radii[start:end, None]).any(dim=0)
        del d
    return fake_in.double().mean().item(), real_in.double().mean().item()

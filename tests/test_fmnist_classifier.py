"""The shipped Fashion-MNIST classifier (FID-FM features): it loads, every input form reaches the network as the
data source's tensor, and bad inputs and files are refused. Synthetic images only; no dataset needed."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexdit.errors import FlexDiTError
from flexdit.measure.fmnist_classifier import WEIGHTS, FashionMNISTClassifier, classify, load_classifier
from flexdit.training.data import open_dataset


@pytest.fixture(scope="module")
def model():
    return load_classifier()


def clothes(n: int, seed: int = 0) -> np.ndarray:
    """Random uint8 (n, 28, 28, 1) images: a bright blob on a noisy background, like a garment on black."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, 28, 28, 1))
    images[:, 4:24, 6:22] += rng.integers(100, 215, size=(n, 1, 1, 1))
    return images.astype(np.uint8)


def write_fashion_mnist(folder: Path, images: np.ndarray) -> None:
    """images (N, 28, 28) uint8 as the test split's idx files, all labelled 0."""
    header = np.array([2051, *images.shape], dtype=">i4").tobytes()
    (folder / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    (folder / "t10k-labels-idx1-ubyte").write_bytes(np.array([2049, len(images)], dtype=">i4").tobytes()
                                                     + bytes(len(images)))


def test_shipped_weights_classify_a_batch(model):
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert not model.training
    images = np.pad(clothes(7), ((0, 0), (2, 2), (2, 2), (0, 0)))  # (7, 32, 32, 1)
    features, logits = classify(model, images, batch_size=3)
    assert features.shape == (7, 128) and logits.shape == (7, 10)
    assert features.dtype == logits.dtype == np.float64
    assert np.isfinite(features).all() and np.isfinite(logits).all() and features.std(axis=0).max() > 0
    one_batch = classify(model, images, batch_size=500)
    np.testing.assert_allclose(one_batch[0], features, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.testing.assert_allclose(one_batch[1], expected.double().numpy(), rtol=1e-5, atol=1e-5)


def test_every_input_form_is_the_data_source_tensor(model, tmp_path):
    raw = clothes(5, seed=1)  # (5, 28, 28, 1)
    write_fashion_mnist(tmp_path, raw[..., 0])
    x, _ = open_dataset(str(tmp_path), split="test").batch(torch.arange(5))  # (5, 1, 32, 32) in [-1, 1]
    padded = np.pad(raw, ((0, 0), (2, 2), (2, 2), (0, 0)))  # (5, 32, 32, 1), background 0
    from_28 = classify(model, raw)
    for other in (classify(model, padded), classify(model, torch.from_numpy(padded)), classify(model, x),
                  classify(model, x.numpy())):
        np.testing.assert_array_equal(other[0], from_28[0])
        np.testing.assert_array_equal(other[1], from_28[1])


def test_classify_errors(model):
    good = np.zeros((2, 32, 32, 1), dtype=np.uint8)
    for images, match in [
        (np.zeros((2, 32, 32), dtype=np.uint8), r"shape \(2, 32, 32\); expected \(N, 32, 32, 1\)"),
        (np.zeros((2, 1, 32, 32), dtype=np.uint8), "NHWC"),
        (np.zeros((2, 32, 32, 3), dtype=np.uint8), r"\(2, 32, 32, 3\)"),
        (np.zeros((2, 30, 30, 1), dtype=np.uint8), r"\(2, 30, 30, 1\)"),
        (torch.zeros(2, 32, 32, 1), r"float images have shape \(2, 32, 32, 1\)"),
        (torch.full((2, 1, 32, 32), 255.0), r"in \[-1, 1\]"),
        (np.zeros((2, 32, 32, 1), dtype=np.int32), "dtype torch.int32"),
        (good[:0], "no images"),
    ]:
        with pytest.raises(FlexDiTError, match=match):
            classify(model, images)
    with pytest.raises(FlexDiTError, match="batch_size must be at least 1"):
        classify(model, good, batch_size=0)


def test_load_classifier_errors(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FlexDiTError, match=f"not found: {missing}"):
        load_classifier(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(FlexDiTError, match=f"cannot read classifier weights {corrupt}"):
        load_classifier(corrupt)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    with pytest.raises(FlexDiTError, match=f"{other} does not hold FashionMNISTClassifier weights"):
        load_classifier(other)
    state = {k: v.clone() for k, v in FashionMNISTClassifier().state_dict().items()}
    save_file(state, str(tmp_path / "fresh.safetensors"))
    assert isinstance(load_classifier(tmp_path / "fresh.safetensors"), FashionMNISTClassifier)


def test_shipped_weights_record_their_test_accuracy():
    with safe_open(str(WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "flexdit-fmnist-classifier"
    assert float(metadata["test_accuracy"]) >= 0.90


def test_training_translation_moves_content_and_fills_background():
    path = Path(__file__).parents[1] / "scripts" / "train_fmnist_classifier.py"
    spec = importlib.util.spec_from_file_location("train_fmnist_classifier", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    x = torch.rand(2, 1, 6, 6)
    moved = script.translate(x, torch.tensor([[1, -2], [0, 0]]), max_shift=2)
    assert torch.equal(moved[0, 0, 1:, :4], x[0, 0, :5, 2:])  # down 1, left 2
    assert (moved[0, 0, 0] == -1).all() and (moved[0, 0, :, 4:] == -1).all()
    assert torch.equal(moved[1], x[1])

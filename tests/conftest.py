"""Shared fixtures: tiny models with random non-zero weights (zero-initialised adaLN would hide bugs), tiny
Fashion-MNIST-format data."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from flexdit.models.dit import DiT, DiTConfig
from flexdit.models.layout import Layout


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fill every parameter with N(0, scale^2) so that every path of the model contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_config(layout: Layout | None = None, **kw) -> DiTConfig:
    cfg = dict(input_size=(16, 16), patch_size=2, in_channels=4, hidden_size=32, num_heads=4, num_classes=10,
               layout=(layout or Layout.dense(6)).kinds)
    cfg.update(kw)
    return DiTConfig(**cfg)


def tiny_model(layout: Layout | None = None, seed: int = 0, **kw) -> DiT:
    return randomize(DiT(tiny_config(layout, **kw)), seed).eval()


def inputs(model: DiT, batch: int = 2, seed: int = 1, t=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, *model.config.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g) if t is None else torch.as_tensor(t)
    y = torch.randint(0, model.config.num_classes, (batch,), generator=g)
    return x, t, y


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def one_thread(_deterministic):
    """Tiny models: a second thread mostly waits for a core another process holds (30x slower on 2 busy cores)."""
    torch.set_num_threads(1)


def assert_one_line_error(call, words: list[str]) -> None:
    """call() raises a FlexDiTError of one line holding every one of `words`."""
    from flexdit.errors import FlexDiTError

    with torch.no_grad(), pytest.raises(FlexDiTError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def cli_fails(capsys, *argv) -> str:
    """Run the command expecting a user error: exit status 2 and one line on stderr; returns that line."""
    from flexdit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flexdit: error: ") and err.count("\n") == 1
    return err



def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return np.array([magic, *array.shape], dtype=">i4").tobytes() + array.astype(np.uint8).tobytes()


def write_idx(folder, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True):
    """Fashion-MNIST idx files of one split ("train" or "t10k") in `folder`."""
    for name, magic, array in ((f"{prefix}-images-idx3-ubyte", 2051, images),
                               (f"{prefix}-labels-idx1-ubyte", 2049, labels)):
        raw = idx_bytes(magic, array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


def blob_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images of a bright square whose position depends on the class, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for k, c in enumerate(labels):
        r, col = 4 + 2 * (c % 5), 4 + 8 * (c // 5)
        images[k, r:r + 8, col:col + 8] = 255
    images = np.clip(images.astype(int) + rng.integers(0, 30, images.shape), 0, 255).astype(np.uint8)
    return images, labels


REAL_FASHION_MNIST = [Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist",
                      Path("/usr/share/datasets/fashion-mnist")]


def fashion_mnist_train(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n training images (28 x 28 uint8) and labels of the real Fashion-MNIST where this machine has it,
    else class-dependent blobs in the same format."""
    from flexdit.training.data import IDX_FILES, IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC, read_idx

    images_name, labels_name = IDX_FILES["train"]
    source = next((p for p in REAL_FASHION_MNIST if (p / f"{images_name}.gz").exists()), None)
    if source is None:
        return blob_images(n)
    return (read_idx(source / f"{images_name}.gz", IDX_IMAGE_MAGIC)[:n],
            read_idx(source / f"{labels_name}.gz", IDX_LABEL_MAGIC)[:n])


class PoolCalls(list):
    """The sparse grid of every pool_tokens call (the SDTM entries a forward makes), and `.rows` the token rows
    each one pooled (batch x frames)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def clear(self) -> None:
        super().clear()
        self.rows.clear()


@pytest.fixture
def pooled_grids(monkeypatch) -> PoolCalls:
    import flexdit.models.core as core_module

    calls, real = PoolCalls(), core_module.pool_tokens

    def spy(tokens, grid, sparse_grid):
        calls.append(tuple(sparse_grid))
        calls.rows.append(tokens.shape[0])
        return real(tokens, grid, sparse_grid)

    monkeypatch.setattr(core_module, "pool_tokens", spy)
    return calls

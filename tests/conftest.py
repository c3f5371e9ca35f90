"""Shared fixtures: tiny models with random non-zero weights (zero-initialised adaLN would hide bugs)."""
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


def cli_fails(capsys, *argv) -> str:
    """Run the command expecting a user error: exit status 2 and one line on stderr; returns that line."""
    from flexdit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flexdit: error: ") and err.count("\n") == 1
    return err


"""`flexdit demo`: a dense DiT and a FlexDiT sample the same classes from the same noise, side by side."""
import re

import numpy as np
import pytest
from PIL import Image

from flexdit.checkpoints import load
from flexdit.cli import main
from flexdit.demo import DENSE_WEIGHTS, FLEXDIT_WEIGHTS, GAP
from flexdit.models.from_dense import flexdit_from_dense
from flexdit.models.layout import Layout
from flexdit.schedule import DensitySchedule

from conftest import cli_fails, tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny 1 x 16 x 16 pixel-space dense DiT and its FlexDiT, in our format."""
    folder = tmp_path_factory.mktemp("demo")
    dense = tiny_model(Layout.dense(6), input_size=(16, 16), in_channels=1, patch_size=2)
    flex, _ = flexdit_from_dense(dense, Layout.parse("1+1x1-1-1-1+1", 6), DensitySchedule(0.3, 0.8))
    dense.save(folder / "dense.safetensors")
    flex.save(folder / "flexdit.safetensors")
    return folder / "dense.safetensors", folder / "flexdit.safetensors"


def test_demo_writes_both_grids_side_by_side_and_reports_speed(pair, tmp_path, capsys):
    dense, flex = pair
    png = tmp_path / "out" / "demo.png"
    main(["demo", "--dense", str(dense), "--flexdit", str(flex), "--out", str(png), "--steps", "3",
          "--repeats", "1", "--per-class", "2", "--dtype", "fp32"])
    out = capsys.readouterr().out
    image = np.array(Image.open(png))
    grid_h, grid_w = 2 + 10 * (16 + 2), 2 + 2 * (16 + 2)  # one row per class, 2 columns, 2-pixel gaps
    assert image.shape == (grid_h, 2 * grid_w + GAP)
    assert not np.array_equal(image[:, :grid_w], image[:, -grid_w:])  # two different models
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(dense|flexdit)\s+([\d.]+)\s+([\d.]+)$", out, re.M)}
    assert rows.keys() == {"dense", "flexdit"} and rows["flexdit"][0] < rows["dense"][0]
    assert re.search(r"FlexDiT: \d+% fewer FLOPs, [\d.]+x images/s", out)


def test_demo_errors(pair, tmp_path, capsys):
    dense, flex = pair
    err = cli_fails(capsys, "demo", "--dense", tmp_path / "missing.safetensors", "--flexdit", flex)
    assert "demo weights not found" in err and "missing.safetensors" in err
    err = cli_fails(capsys, "demo", "--dense", flex, "--flexdit", dense, "--out", tmp_path / "x.png")
    assert "--dense must be a dense DiT" in err
    assert "--per-class" in cli_fails(capsys, "demo", "--dense", dense, "--flexdit", flex, "--per-class", "0")
    assert "ending in .png" in cli_fails(capsys, "demo", "--dense", dense, "--flexdit", flex, "--out", tmp_path / "x")
    assert "--repeats 0: give a number of at least 1" in cli_fails(capsys, "demo", "--dense", dense, "--flexdit", flex,
                                                                   "--repeats", "0")



def test_the_shipped_weights_are_a_dense_dit_and_its_flexdit():
    dense, flex = load(DENSE_WEIGHTS), load(FLEXDIT_WEIGHTS)
    assert dense.layout.is_dense and flex.layout.has_sparse_tokens
    assert dense.config.input_size == flex.config.input_size == (32, 32) and dense.in_channels == 1
    converted, _ = flexdit_from_dense(dense, layout=flex.layout, density=flex.density)
    # the FlexDiT of this very dense architecture: the same tensors as converting the shipped dense model
    assert {k: v.shape for k, v in flex.state_dict().items()} == {k: v.shape for k, v in converted.state_dict().items()}

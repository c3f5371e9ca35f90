"""The `flexdit` command: convert, info, flops, bench; errors are one line with exit status 2."""
import json

import pytest
import torch

import flexdit
from flexdit.cli import main
from flexdit.checkpoints import dit_state_dict
from flexdit.models.layout import Layout

from conftest import cli_fails, inputs, tiny_model


def run(capsys, *argv) -> str:
    main([str(a) for a in argv])
    return capsys.readouterr().out


@pytest.fixture
def dense_pt(tmp_path):
    # Depth 12: the default FlexDiT layout for 12 layers applies. Hidden 32 is not a standard size.
    model = tiny_model(Layout.dense(12))
    path = tmp_path / "dense.pt"
    torch.save({"ema": dit_state_dict(model)}, path)
    return path, model


def test_convert_dense_to_flexdit(capsys, tmp_path, dense_pt):
    src, dense = dense_pt
    out = json.loads(run(capsys, "convert", src, tmp_path / "flex.safetensors", "--num-heads", 4,
                         "--density", "0.5,0.9", "--json"))
    assert out["source_format"] == "dit" and out["kind"] == "FlexDiT"
    assert out["layout"] == "2+2x1-2-1-1+0"
    assert out["density"] == {"r_min": 0.5, "r_max": 0.9}
    assert len(out["conversion"]["new"]) == 8  # W1, W2 (weight, bias) in 2 recovery blocks
    flex = flexdit.load(tmp_path / "flex.safetensors")
    assert str(flex.layout) == "2+2x1-2-1-1+0"
    torch.testing.assert_close(flex.x_embedder.proj.weight, dense.x_embedder.proj.weight, rtol=0, atol=0)


def test_convert_keeps_dense_with_layout_dense_and_prints_a_table(capsys, tmp_path, dense_pt):
    src, dense = dense_pt
    text = run(capsys, "convert", src, tmp_path / "d.safetensors", "--num-heads", 4, "--layout", "dense")
    assert "format conversion" in text and "dense x12" in text
    x, t, y = inputs(dense)
    with torch.no_grad():
        assert torch.equal(flexdit.load(tmp_path / "d.safetensors")(x, t, y), dense(x, t, y))


def test_info_flops_and_bench(capsys, tmp_path, dense_pt):
    src, _ = dense_pt
    flex_path = tmp_path / "flex.safetensors"
    run(capsys, "convert", src, flex_path, "--num-heads", 4, "--grid", "4")
    info = json.loads(run(capsys, "info", flex_path, "--json"))
    assert info["format"] == "flexdit" and info["grids"]["999"] == "4x4"
    flops = json.loads(run(capsys, "flops", "--ckpt", flex_path, "--sampler", "ddim", "--steps", 10, "--json"))
    assert flops["steps_per_grid"] == {"4x4": 10} and flops["gflops"] < flops["dense_gflops"]
    bench = json.loads(run(capsys, "bench", "--ckpt", src, "--num-heads", 4, "--steps", 5, "--sampler", "ddim",
                           "--repeats", 1, "--warmup", 0, "--json"))
    assert bench["layout"] == "2+2x1-2-1-1+0" and bench["speedup"] > 0 and bench["flops_ratio"] > 1


def test_flops_of_standard_sizes(capsys):
    out = json.loads(run(capsys, "flops", "--model", "DiT-XL/2", "--image-size", 256, "--json"))
    assert out["gflops"] == pytest.approx(118.6, rel=0.01)
    out = json.loads(run(capsys, "flops", "--model", "DiT-XL/2", "--image-size", 512, "--density", "0.90,0.96",
                         "--json"))
    assert out["layout"] == "2+4x1-3-1-1+2" and out["dense_gflops"] == pytest.approx(525, rel=0.01)
    text = run(capsys, "flops", "--model", "FlexDiT-B/2")
    assert "10x10" in text and "6x6" in text


def test_errors_are_one_line(capsys, tmp_path, dense_pt):
    src, _ = dense_pt
    cli_fails(capsys, "convert", tmp_path / "missing.pt", tmp_path / "o.safetensors")
    cli_fails(capsys, "convert", src, tmp_path / "o.safetensors")  # hidden 32: heads unknown
    cli_fails(capsys, "convert", src, tmp_path / "o.safetensors", "--num-heads", 4, "--layout", "2+4x1-3-1-1+2")
    cli_fails(capsys, "convert", src, tmp_path / "o.safetensors", "--num-heads", 4, "--density", "0.9,0.5")
    cli_fails(capsys, "flops", "--model", "DiT-XXL/2")
    cli_fails(capsys, "flops", "--model", "DiT-XL/2", "--image-size", 100)
    cli_fails(capsys, "flops", "--model", "DiT-XL/2", "--grid", "40")

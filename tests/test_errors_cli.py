"""The command line's error paths shared by every command (numbers, ranges, outputs, dtype, pipes), one case per
defect: each exits with status 2, prints one line and no traceback, names the problem, and writes nothing."""
import os
import subprocess
import sys

import pytest
import torch

from flexdit.cli import main
from flexdit.distributed import resolve_dtype
from flexdit.errors import FlexDiTError
from flexdit.models.layout import Layout
from flexdit.sampling import sample

from conftest import cli_fails, tiny_model


@pytest.fixture
def ckpt(tmp_path):
    """A tiny pixel-space dense DiT (1 x 8 x 8, 10 classes) in our format."""
    path = tmp_path / "tiny.safetensors"
    tiny_model(Layout.dense(2), input_size=(8, 8), in_channels=1).save(str(path))
    return path


# (argv with {ckpt} and {tmp} placeholders, key words of the message)
CASES = {
    # non-finite and out-of-range numbers
    "cfg nan": (["sample", "--ckpt", "{ckpt}", "--cfg", "nan"], ["--cfg", "finite"]),
    "eta inf": (["sample", "--ckpt", "{ckpt}", "--eta", "inf"], ["--eta", "finite"]),
    "eta negative": (["sample", "--ckpt", "{ckpt}", "--eta", "-0.5", "--sampler", "ddim", "--out", "{tmp}/a.png"],
                     ["eta", "at least 0"]),
    "cfg below 1": (["sample", "--ckpt", "{ckpt}", "--cfg", "0.5", "--out", "{tmp}/a.png"], ["cfg", "at least 1"]),
    "seed negative": (["sample", "--ckpt", "{ckpt}", "--seed", "-1"], ["--seed", "out of range"]),
    "seed overflow": (["sample", "--ckpt", "{ckpt}", "--seed", str(2**70)], ["--seed", "out of range"]),
    "class id out of range": (["sample", "--ckpt", "{ckpt}", "--classes", "3,10", "--out", "{tmp}/a.png"],
                              ["class id 10", "0..9"]),
    "class id overflow": (["sample", "--ckpt", "{ckpt}", "--classes", str(2**70), "--out", "{tmp}/a.png"],
                          ["class id", "0..9"]),
    "negative class id": (["sample", "--ckpt", "{ckpt}", "--classes", "-1", "--out", "{tmp}/a.png"], ["class id -1"]),
    "empty classes": (["sample", "--ckpt", "{ckpt}", "--classes", ""], ["--classes"]),
    "grid-max 0": (["sample", "--ckpt", "{ckpt}", "--grid-max", "0"], ["--grid-max", "at least 1"]),
    "num-samples 0": (["sample", "--ckpt", "{ckpt}", "--num-samples", "0"], ["--num-samples", "at least 1"]),
    "sample steps 0": (["sample", "--ckpt", "{ckpt}", "--steps", "0"], ["--steps", "at least 1"]),
    "num-heads 0": (["info", "{ckpt}", "--num-heads", "0"], ["--num-heads", "at least 1"]),
    "input-size 0": (["info", "{ckpt}", "--input-size", "0"], ["--input-size", "at least 1"]),
    "image-size 0": (["flops", "--image-size", "0"], ["--image-size", "at least 1"]),
    "image-size not a multiple of 8": (["flops", "--image-size", "12"], ["--image-size", "multiple of 8"]),
    "bench repeats 0": (["bench", "--repeats", "0"], ["--repeats", "at least 1"]),
    "bench warmup negative": (["bench", "--warmup", "-1"], ["--warmup", "at least 0"]),
    "demo per-class 0": (["demo", "--per-class", "0"], ["--per-class", "at least 1"]),
    "not a number": (["flops", "--steps", "many"], ["--steps", "invalid int"]),
    "unknown dtype": (["sample", "--ckpt", "{ckpt}", "--dtype", "fp64"], ["--dtype", "invalid choice"]),
    "num-samples too large": (["sample", "--ckpt", "{ckpt}", "--num-samples", str(2**40)],
                              ["--num-samples", "too large"]),
    # inconsistent settings
    "eta without ddim": (["sample", "--ckpt", "{ckpt}", "--eta", "0.5", "--sampler", "ddpm"], ["--eta", "ddim"]),
    "latents under a png": (["sample", "--ckpt", "{ckpt}", "--vae", "none", "--npz", "{tmp}/l.npz",
                             "--out", "{tmp}/a.png"], ["--vae none", "without --out"]),
    "ckpt and model": (["flops", "--ckpt", "{ckpt}", "--model", "DiT-S/2"], ["--ckpt", "--model"]),
    "empty density": (["flops", "--model", "FlexDiT-S/2", "--density", ""], ["--density"]),
    "inception weights for fmnist features": (["eval", "{tmp}/a.npz", "{tmp}/b.npz", "--features", "fmnist",
                                               "--inception", "{ckpt}"], ["--inception", "fmnist"]),
    "density for a dense layout": (["flops", "--layout", "dense", "--density", "0.5,0.9"], ["density", "dense"]),
    "grid for a dense layout": (["flops", "--layout", "dense", "--grid", "4"], ["grid", "dense"]),
    # outputs, refused before any sampling
    "out is a directory": (["sample", "--ckpt", "{ckpt}", "--out", "{tmp}/folder.png"], ["directory"]),
    "out through a file": (["sample", "--ckpt", "{ckpt}", "--out", "{tmp}/file.txt/a.png"], ["is a file"]),
    "empty out": (["sample", "--ckpt", "{ckpt}", "--out", ""], ["--out", "empty"]),
    "empty train out": (["train", "--model", "DiT-S/2", "--data", "{tmp}", "--out", ""], ["--out", "empty"]),
    "name too long": (["info", "{tmp}/" + "x" * 300], ["File name too long"]),
    "damaged config": (["info", "{tmp}/damaged.safetensors"], ["hidden_size", "positive integer"]),
    "out unwritable": (["sample", "--ckpt", "{ckpt}", "--out", "/proc/flexdit.png"], ["cannot write"]),
    "png under jpg": (["sample", "--ckpt", "{ckpt}", "--out", "{tmp}/a.jpg"], [".png"]),
    "npz and png the same name": (["sample", "--ckpt", "{ckpt}", "--npz", "{tmp}/x", "--out", "{tmp}/x"], [".png"]),
    "npz would replace the checkpoint": (["sample", "--ckpt", "{tmp}/ckpt.npz", "--npz", "{tmp}/ckpt.npz"],
                                         ["is the input"]),
    "npz is a directory": (["sample", "--ckpt", "{ckpt}", "--npz", "{tmp}/folder.npz"], ["directory"]),
    "demo out under jpg": (["demo", "--out", "{tmp}/demo.jpg"], [".png"]),
    "demo out is a directory": (["demo", "--out", "{tmp}/folder.png"], ["directory"]),
}


@pytest.mark.parametrize("name", CASES)
def test_cli_error(name, capsys, tmp_path, ckpt):
    argv, words = CASES[name]
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "ckpt.npz").write_bytes(ckpt.read_bytes())  # a checkpoint under an npz name
    damaged = tiny_model(Layout.dense(2), input_size=(8, 8), in_channels=1)
    damaged.config.hidden_size = -32  # a lying config in the file's metadata
    damaged.save(str(tmp_path / "damaged.safetensors"))
    before = sorted(os.listdir(tmp_path))
    err = cli_fails(capsys, *[a.format(ckpt=ckpt, tmp=tmp_path) for a in argv])
    assert "Traceback" not in err
    for word in words:
        assert word in err, (name, err)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_a_message_holding_a_newline_stays_on_one_line(capsys, tmp_path):
    err = cli_fails(capsys, "info", tmp_path / "two\nlines.safetensors")
    assert "two\\nlines" in err


def test_sampling_stops_at_a_non_finite_step():
    """Finite but huge weights overflow to inf in the sampler's state: an error, not a black image."""
    model = tiny_model(Layout.dense(2), input_size=(8, 8), in_channels=1)
    with torch.no_grad():
        model.final_layer.linear.weight.fill_(1e38)
    with pytest.raises(FlexDiTError, match="non-finite values at timestep"):
        sample(model, [1, 2], "ddim", 3)


def test_auto_dtype_follows_the_hardware(monkeypatch):
    import flexdit.distributed as d

    cpu = torch.device("cpu")
    monkeypatch.setattr(d, "cpu_runs_bf16_natively", lambda: False)
    assert resolve_dtype("auto", cpu) == "fp32"
    monkeypatch.setattr(d, "cpu_runs_bf16_natively", lambda: True)
    assert resolve_dtype("auto", cpu) == "bf16"
    assert resolve_dtype("fp32", cpu) == "fp32"  # an explicit choice is kept
    with pytest.raises(FlexDiTError, match="unknown --dtype"):
        resolve_dtype("fp64", cpu)


def test_sample_prints_the_dtype_it_chose(capsys, tmp_path, ckpt):
    main(["sample", "--ckpt", str(ckpt), "--num-samples", "2", "--steps", "2", "--sampler", "ddim",
          "--out", str(tmp_path / "s.png")])
    assert f"sampling in {resolve_dtype('auto', torch.device('cpu'))} on cpu (--dtype auto)" in capsys.readouterr().out


def test_output_piped_into_head_ends_quietly_and_the_work_is_done(tmp_path, ckpt):
    """`flexdit ... | head -1`: the closed pipe raises no BrokenPipeError and does not stop the command's work."""
    proc = subprocess.run(f"{sys.executable} -m flexdit flops --json | head -1", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout == "{\n" and proc.stderr == ""
    png = tmp_path / "s.png"
    proc = subprocess.run(f"{sys.executable} -m flexdit sample --ckpt {ckpt} --num-samples 2 --steps 2 --sampler ddim "
                          f"--out {png} 2>/dev/null | head -c 1", shell=True, capture_output=True, timeout=120)
    assert proc.returncode == 0 and png.stat().st_size > 0


def test_train_refuses_an_init_inside_its_out(capsys, tmp_path, ckpt):
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    data.mkdir()
    init = run / "ema.safetensors"  # a finished run's weights, which a new run in that folder would overwrite
    init.write_bytes(ckpt.read_bytes())
    err = cli_fails(capsys, "train", "--init", init, "--data", data, "--out", run, "--dtype", "fp32")
    assert "--init" in err and "inside --out" in err
    assert init.read_bytes() == ckpt.read_bytes()

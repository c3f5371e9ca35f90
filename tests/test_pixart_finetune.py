"""A tiny end-to-end text-to-image fine-tune through the command line: a dense PixArt in the original repository's
layout, captions made from Fashion-MNIST's class names and encoded by a small T5 built from a config, converted to a
FlexDiT by `flexdit train --init`, trained (loss falls), resumed exactly, and sampled from prompts."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flexdit.cli import main
from flexdit.models.layout import Layout
from flexdit.models.pixart import PixArt, PixArtConfig
from flexdit.text import CaptionTable
from conftest import fashion_mnist_train, randomize, write_idx
from text_fixtures import make_tiny_text_encoder

SAMPLES = 256


def fashion_mnist_subset(folder: Path) -> Path:
    """The first SAMPLES training images of Fashion-MNIST (conftest.fashion_mnist_train) as idx files in `folder`."""
    folder.mkdir()
    write_idx(folder, "train", *fashion_mnist_train(SAMPLES))
    return folder


def original_pixart_file(path: Path) -> Path:
    """A dense PixArt (1 channel, 32 x 32 pixels, patch 4) saved as PixArt-alpha's train script saves it."""
    config = PixArtConfig(input_size=(32, 32), patch_size=4, in_channels=1, hidden_size=48, num_heads=4,
                          caption_channels=32, caption_length=12, layout=Layout.dense(5).kinds)
    model = randomize(PixArt(config), seed=0, scale=0.05)
    torch.save({"state_dict": {**model.state_dict(), "pos_embed": model.pos_embed}}, path)
    return path


def losses(log: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_text_to_image_finetune_from_a_converted_pixart(tmp_path, capsys):
    data = fashion_mnist_subset(tmp_path / "fmnist")
    t5 = make_tiny_text_encoder(tmp_path / "t5", d_model=32)
    init = original_pixart_file(tmp_path / "PixArt-tiny.pth")
    captions = tmp_path / "captions.safetensors"
    main(["extract-captions", "--data", str(data), "--text-encoder", str(t5), "--out", str(captions), "--device", "cpu"])
    table = CaptionTable.load(captions)
    assert table.per == "class" and table.captions[9] == "a photo of a ankle boot" and len(table) == 10

    train = ["train", "--init", str(init), "--num-heads", "4", "--data", str(data), "--captions", str(captions),
             "--layout", "1+1x1-1-1-0+1", "--density", "0.3,0.8", "--intervals", "2", "--batch", "16",
             "--lr", "2e-3", "--log-every", "5", "--ckpt-every", "20", "--device", "cpu", "--dtype", "fp32",
             "--out", str(tmp_path / "run")]
    main(train + ["--steps", "20"])
    main(train + ["--steps", "40", "--resume"])
    curve = losses(tmp_path / "run" / "log.jsonl")
    assert len(curve) == 8 and np.mean(curve[-2:]) < 0.7 * np.mean(curve[:2])
    capsys.readouterr()

    main(["info", str(tmp_path / "run" / "ema.safetensors"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "FlexDiT-PixArt" and info["layout"] == "1+1x1-1-1-0+1"
    main(["sample", "--ckpt", str(tmp_path / "run" / "ema.safetensors"), "--text-encoder", str(t5),
          "--prompt", "a photo of a trouser", "--prompt", "a photo of a bag", "--num-samples", "4", "--cfg", "2",
          "--sampler", "ddim", "--steps", "5", "--device", "cpu", "--npz", str(tmp_path / "s.npz"),
          "--out", str(tmp_path / "s.png")])
    out = np.load(tmp_path / "s.npz")
    assert out["arr_0"].shape == (4, 32, 32, 1) and out["arr_1"].tolist() == [0, 1, 0, 1]


def test_resume_on_other_captions_is_refused(tmp_path, capsys):
    data = fashion_mnist_subset(tmp_path / "fmnist")
    t5 = make_tiny_text_encoder(tmp_path / "t5", d_model=32)
    init = original_pixart_file(tmp_path / "PixArt-tiny.pth")
    first, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    main(["extract-captions", "--data", str(data), "--text-encoder", str(t5), "--out", str(first), "--device", "cpu"])
    main(["extract-captions", "--data", str(data), "--text-encoder", str(t5), "--out", str(other), "--device", "cpu",
          "--template", "a picture of a {}"])
    train = ["train", "--init", str(init), "--num-heads", "4", "--data", str(data), "--layout", "dense",
             "--batch", "8", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    main(train + ["--captions", str(first)])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(train + ["--captions", str(other), "--resume", "--steps", "4"])
    assert "--captions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(train[:-1] + [str(tmp_path / "run2")])  # a PixArt needs its captions
    assert "--captions TABLE" in capsys.readouterr().err

"""Latte through flexdit.load and the command line: the original Vchitect/Latte files ({"ema", "model"}) and
diffusers LatteTransformer3DModel folders, against the original forward and diffusers; a tiny video fine-tune from a
converted Latte on moving Fashion-MNIST whose loss falls, resumed exactly, sampled to GIFs, a PNG strip and an npz."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flexdit
from flexdit.cli import main
from flexdit.training.video_data import moving_fashion_mnist, write_video_npz
from conftest import fashion_mnist_train, randomize
from test_latte import (CLASSES, FRAMES, HEADS, SIZE, caption_batch, diffusers_forward, diffusers_latte,
                        original_forward, original_state, original_videos)



@pytest.mark.parametrize("classes, wrapper", [(None, "ema"), (CLASSES, "model")])
def test_original_files_load_and_match_the_original_forward(tmp_path, classes, wrapper):
    state = original_state(classes=classes)
    other = original_state(classes=classes, seed=9)
    torch.save({wrapper: state} if wrapper == "model" else {"ema": state, "model": other}, tmp_path / "latte.pt")
    loaded = flexdit.load_checkpoint(tmp_path / "latte.pt", num_heads=HEADS)
    model = loaded.model
    assert loaded.format == "latte" and model.config.frames == FRAMES
    assert model.condition_kind == ("class" if classes else "none")
    x, t = original_videos(2)  # (B, F, C, H, W): the original's layout
    y = torch.tensor([1, 3]) if classes else None
    with torch.no_grad():
        ours = model(x.transpose(1, 2), t, y=y).transpose(1, 2)
    torch.testing.assert_close(ours, original_forward(state, x, t, y), atol=1e-4, rtol=1e-4)


def test_diffusers_folder_loads_and_matches(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers_latte(diffusers, frames=FRAMES)
    theirs.save_pretrained(tmp_path / "Latte-tiny" / "transformer")  # a LattePipeline folder's layout
    loaded = flexdit.load_checkpoint(tmp_path / "Latte-tiny")
    assert loaded.format == "diffusers-latte" and loaded.model.condition_kind == "caption"
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, FRAMES, SIZE, SIZE, generator=g), torch.tensor([10, 900])
    caption, _ = caption_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, caption=caption), diffusers_forward(theirs, x, t, caption),
                                   atol=1e-4, rtol=1e-4)


def moving_fmnist_npz(path: Path, videos: int = 96) -> Path:
    """Real garments (conftest.fashion_mnist_train) moving over 4 frames of 32 x 32."""
    images, labels = fashion_mnist_train(videos)
    clips, clip_labels = moving_fashion_mnist(images, labels, videos, frames=4, size=32, seed=0)
    write_video_npz(path, clips, clip_labels)
    return path


def original_latte_file(path: Path) -> Path:
    """A dense class-conditional Latte (10 classes, 1 channel, 4 frames of 32 x 32, patch 4) in the original layout."""
    from flexdit.models.latte import Latte, LatteConfig
    from flexdit.models.layout import Layout

    config = LatteConfig(input_size=(32, 32), patch_size=4, in_channels=1, hidden_size=48, num_heads=4, frames=4,
                         conditioning="class", num_classes=10, layout=Layout.dense(4).kinds)
    model = randomize(Latte(config), seed=0, scale=0.05)
    torch.save({"ema": original_layout_state(model)}, path)
    return path


def original_layout_state(model) -> dict[str, torch.Tensor]:
    """Our Latte's weights in the original layout: pair i's spatial block is blocks.2i, its temporal one blocks.2i+1;
    the original also stores its sin-cos tables."""
    from flexdit.models.latte import positions

    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            temporal = rest.startswith("temporal.")
            key = f"blocks.{2 * int(i) + temporal}.{rest.removeprefix('temporal.')}"
        out[key] = value
    return {**out, **positions(model.config)}


def test_video_finetune_from_a_converted_latte_on_moving_fashion_mnist(tmp_path, capsys):
    data = moving_fmnist_npz(tmp_path / "moving-fmnist.npz")
    init = original_latte_file(tmp_path / "Latte-tiny.pt")
    train = ["train", "--init", str(init), "--num-heads", "4", "--data", str(data), "--layout", "1+1x1-1-1-0+0",
             "--density", "0.3,0.8", "--intervals", "2", "--batch", "8", "--lr", "2e-3", "--log-every", "5",
             "--ckpt-every", "15", "--device", "cpu", "--dtype", "fp32", "--out", str(tmp_path / "run")]
    main(train + ["--steps", "15"])
    main(train + ["--steps", "30", "--resume"])
    curve = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(curve) == 6 and np.mean(curve[-2:]) < 0.7 * np.mean(curve[:2])
    capsys.readouterr()
    main(["info", str(tmp_path / "run" / "ema.safetensors"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "FlexDiT-Latte" and info["frames"] == 4 and info["layout"] == "1+1x1-1-1-0+0"

    out = tmp_path / "videos.png"
    main(["sample", "--ckpt", str(tmp_path / "run" / "ema.safetensors"), "--classes", "1,8", "--sampler", "ddim",
          "--steps", "4", "--cfg", "2", "--device", "cpu", "--out", str(out), "--npz", str(tmp_path / "v.npz")])
    npz = np.load(tmp_path / "v.npz")
    assert npz["arr_0"].shape == (2, 4, 32, 32, 1) and npz["arr_1"].tolist() == [1, 8]
    assert Image.open(out).size == (4 * 34 + 2, 2 * 34 + 2)  # a strip of 4 frames per video
    gif = Image.open(tmp_path / "videos-001.gif")
    assert gif.n_frames >= 1 and gif.size == (32, 32) and gif.info.get("loop") == 0


def test_extract_latents_of_videos_frame_by_frame(tmp_path, capsys):
    from diffusers import AutoencoderKL

    from flexdit.training.data import open_dataset
    from flexdit.training.video_data import open_video_dataset

    data = moving_fmnist_npz(tmp_path / "v.npz", videos=6)
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4, sample_size=32).save_pretrained(
        tmp_path / "vae")
    main(["extract-latents", "--videos", str(data), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "lat"),
          "--frames", "2", "--batch", "4", "--device", "cpu"])
    stored = open_dataset(str(tmp_path / "lat"))
    on_the_fly = open_video_dataset(str(data), frames=2, vae=str(tmp_path / "vae"))
    assert stored.sample_shape == on_the_fly.sample_shape == (4, 2, 16, 16)
    x, y = stored.batch(torch.arange(6))
    x_fly, y_fly = on_the_fly.batch(torch.arange(6))
    assert torch.equal(y, y_fly)
    torch.testing.assert_close(x, x_fly, atol=2e-3, rtol=2e-3)  # float16 shards
    with pytest.raises(SystemExit):
        main(["extract-latents", "--images", str(tmp_path), "--vae", str(tmp_path / "vae"), "--out",
              str(tmp_path / "o")])
    assert "--image-size" in capsys.readouterr().err

"""Video files (GIF, MP4, PNG strips), per-frame decoding, Moving Fashion-MNIST and the video data sources, on
tiny synthetic videos and a tiny random VAE."""
import os
import re
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexdit.errors import FlexDiTError
from flexdit.sampling import decode
from flexdit.training.data import FASHION_MNIST_CLASS_NAMES, LatentsData, encode_latents, load_image, open_dataset
from flexdit.training.video_data import (VideoFolderData, VideoNpzData, bounce, extract_video_latents,
                                         fashion_mnist_videos,
                                         moving_fashion_mnist, open_video_dataset, write_fashion_mnist_videos,
                                         write_video_npz)
from flexdit.vae import load_vae
from flexdit.video import decode_video, frame_strip, mp4_available, save_gif, save_mp4, save_png, video_grid

from conftest import blob_images, write_idx

FMNIST = Path("/work/shared/data/fashion-mnist")


def random_videos(n=3, f=5, h=6, w=7, c=1, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, f, h, w, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A random AutoencoderKL that halves each side (two encoder blocks)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4, sample_size=8)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


# --- GIF, MP4, PNG --------------------------------------------------------------------------------------
def read_gif(path) -> tuple[list[np.ndarray], dict]:
    with Image.open(path) as gif:
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.array(gif.convert("RGB")))
        return frames, dict(gif.info)


def test_gif_round_trip_grey_and_rgb(tmp_path):
    grey = random_videos(1, 4, 9, 11, 1)[0]  # (F, H, W, 1): stored exactly
    frames, info = read_gif_saved(tmp_path / "grey.gif", grey, fps=8)
    assert len(frames) == 4 and info["loop"] == 0 and info["duration"] == 120  # 125 ms in whole centiseconds
    assert all((f == g).all() for f, g in zip(frames, np.repeat(grey, 3, axis=-1)))
    palette = np.random.default_rng(1).integers(0, 256, (16, 3), dtype=np.uint8)  # fewer than 256 colours
    rgb = palette[np.random.default_rng(2).integers(0, 16, (5, 8, 10))]  # (F, H, W, 3)
    frames, _ = read_gif_saved(tmp_path / "rgb.gif", rgb, fps=25)
    assert len(frames) == 5 and all((f == g).all() for f, g in zip(frames, rgb))


def read_gif_saved(path, frames, fps):
    save_gif(frames, path, fps)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
    return read_gif(path)


@pytest.mark.parametrize("frames, fps, match", [
    (np.zeros((2, 4, 4, 3), np.float32), 8, "uint8"),
    (np.zeros((2, 4, 4, 2), np.uint8), 8, "C 1 or 3"),
    (np.zeros((4, 4, 3), np.uint8), 8, r"\(F, H, W, C\)"),
    (np.zeros((0, 4, 4, 3), np.uint8), 8, "F >= 1"),
    (np.zeros((2, 4, 4, 3), np.uint8), 0, "fps must be positive"),
    (np.zeros((2, 4, 4, 3), np.uint8), 100, "at most 50"),
])
def test_save_gif_refuses(tmp_path, frames, fps, match):
    with pytest.raises(FlexDiTError, match=match):
        save_gif(frames, tmp_path / "x.gif", fps)
    assert not (tmp_path / "x.gif").exists()


def fake_ffmpeg(folder: Path, fail: bool = False) -> Path:
    """An `ffmpeg` that records its arguments and copies stdin to its last argument (or fails like a build
    without libx264)."""
    folder.mkdir()
    script = folder / "ffmpeg"
    body = ("import sys\nopen(sys.argv[0] + '.args', 'w').write('\\n'.join(sys.argv[1:]))\n" +
            ("sys.stderr.write('Unknown encoder libx264\\n'); sys.exit(1)\n" if fail else
             "open(sys.argv[-1], 'wb').write(sys.stdin.buffer.read())\n"))
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture
def no_imageio_ffmpeg(monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # its import fails


def test_mp4_needs_an_encoder(tmp_path, monkeypatch, no_imageio_ffmpeg):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert not mp4_available()
    with pytest.raises(FlexDiTError, match="pip install imageio-ffmpeg"):
        save_mp4(random_videos(1)[0], tmp_path / "v.mp4")
    assert not (tmp_path / "v.mp4").exists()


def test_mp4_pipes_rgb_frames_to_ffmpeg(tmp_path, monkeypatch, no_imageio_ffmpeg):
    script = fake_ffmpeg(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(script.parent))
    assert mp4_available()
    grey = random_videos(1, 3, 5, 7, 1)[0]
    save_mp4(grey, tmp_path / "v.mp4", fps=12)
    assert (tmp_path / "v.mp4").read_bytes() == np.repeat(grey, 3, axis=-1).tobytes()  # (F, H, W, 3) rgb24
    args = Path(f"{script}.args").read_text().split("\n")
    assert args[args.index("-s") + 1] == "7x5" and args[args.index("-r") + 1] == "12"
    assert args[args.index("-pix_fmt", args.index("-i")) + 1] == "yuv420p"

    script = fake_ffmpeg(tmp_path / "bad", fail=True)
    monkeypatch.setenv("PATH", str(script.parent))
    with pytest.raises(FlexDiTError, match="Unknown encoder libx264"):
        save_mp4(grey, tmp_path / "w.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "bin", "v.mp4"]  # no temporary left


@pytest.mark.skipif(not mp4_available(), reason="no local ffmpeg")
def test_mp4_with_the_real_encoder(tmp_path):
    save_mp4(random_videos(1, 4, 15, 17, 3)[0], tmp_path / "v.mp4")  # odd sides: padded
    assert (tmp_path / "v.mp4").read_bytes()[4:8] == b"ftyp"


def test_strip_and_grid_geometry(tmp_path):
    videos = random_videos(3, 4, 5, 6, 3)  # (N, F, H, W, C)
    n, f, h, w, _ = videos.shape
    grid = video_grid(videos)
    assert grid.shape == (n * (h + 2) + 2, f * (w + 2) + 2, 3) and grid.dtype == np.uint8
    painted = np.zeros(grid.shape[:2], bool)
    for r in range(n):
        top = 2 + r * (h + 2)
        for t in range(f):
            left = 2 + t * (w + 2)
            assert (grid[top:top + h, left:left + w] == videos[r, t]).all()
            painted[top:top + h, left:left + w] = True
        strip = frame_strip(videos[r])
        assert strip.shape == (h, f * w + 2 * (f - 1), 3) and (strip == grid[top:top + h, 2:-2]).all()
    assert (grid[~painted] == 255).all()  # white gaps and border
    save_png(grid, tmp_path / "grid.png")
    assert (np.array(Image.open(tmp_path / "grid.png")) == grid).all()
    grey = random_videos(2, 3, 4, 4, 1)
    save_png(video_grid(grey), tmp_path / "grey.png")
    assert (np.array(Image.open(tmp_path / "grey.png")) == video_grid(grey)[..., 0]).all()
    with pytest.raises(FlexDiTError, match=r"\(N, F, H, W, C\)"):
        video_grid(videos[0])


# --- decoding -------------------------------------------------------------------------------------------
def per_frame(latents: torch.Tensor, vae=None) -> np.ndarray:
    """The reference: flexdit.sampling.decode on each frame's batch, stacked along frames."""
    return np.stack([decode(latents[:, :, t], vae) for t in range(latents.shape[2])], axis=1)


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_video_pixels(channels):
    latents = torch.randn(2, channels, 5, 6, 7) * 1.5  # some values outside [-1, 1]
    out = decode_video(latents, chunk=3)  # 3 does not divide B * F = 10
    assert out.shape == (2, 5, 6, 7, channels) and out.dtype == np.uint8
    assert (out == per_frame(latents)).all()


def test_decode_video_with_a_vae(vae_dir):
    vae = load_vae(str(vae_dir))
    latents = torch.randn(2, 4, 3, 4, 4)
    out = decode_video(latents, vae, chunk=4)
    assert out.shape == (2, 3, 8, 8, 3)
    assert np.abs(out.astype(int) - per_frame(latents, vae)).max() <= 1  # other batch sizes may round differently
    with pytest.raises(FlexDiTError, match="4-channel latents"):
        decode_video(torch.randn(1, 8, 2, 4, 4), vae)


def test_decode_video_refuses():
    with pytest.raises(FlexDiTError, match=r"\(B, C, F, H, W\)"):
        decode_video(torch.randn(2, 3, 4, 4))
    with pytest.raises(FlexDiTError, match="need a VAE"):
        decode_video(torch.randn(1, 4, 2, 4, 4))
    with pytest.raises(FlexDiTError, match="chunk"):
        decode_video(torch.randn(1, 1, 2, 4, 4), chunk=0)


# --- Moving Fashion-MNIST -------------------------------------------------------------------------------
def simulate(start: float, velocity: float, frames: int, room: int) -> list[int]:
    """Step by step: move, and reflect off 0 and `room` (one bounce a step, as |velocity| < room)."""
    p, v, out = start, velocity, [round(start)]
    for _ in range(frames - 1):
        p += v
        if p > room:
            p, v = 2 * room - p, -v
        if p < 0:
            p, v = -p, -v
        out.append(round(p))
    return out


def test_bounce_matches_a_step_by_step_simulation():
    rng = np.random.default_rng(0)
    room = 9
    start, velocity = rng.uniform(0, room, 20), rng.uniform(-room + 0.5, room - 0.5, 20)
    positions = bounce(start, velocity, 12, room)
    for k in range(20):
        assert positions[k].tolist() == simulate(start[k], velocity[k], 12, room)
    assert (bounce(np.zeros(2), np.ones(2), 3, 0) == 0).all()  # no room: no motion


def unique_garments(n: int, h: int = 28, w: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """n distinct images with no zero pixel (so a frame's non-zero box is the whole garment), label = index."""
    rng = np.random.default_rng(3)
    return rng.integers(1, 256, (n, h, w), dtype=np.uint8), np.arange(n)


def test_moving_fashion_mnist_moves_whole_garments_deterministically():
    images, labels = unique_garments(6, 20, 24)
    videos, ids = moving_fashion_mnist(images, labels, 10, frames=7, size=40, seed=5)
    assert videos.shape == (10, 7, 40, 40) and videos.dtype == np.uint8 and ids.dtype == np.int64
    assert sorted(set(ids.tolist())) == list(range(6))  # 10 > 6 videos: every garment, some twice
    moved = 0
    for video, i in zip(videos, ids):
        corners = []
        for frame in video:
            assert frame.sum(dtype=np.int64) == images[i].sum(dtype=np.int64)  # the whole garment, once
            (r0, c0), (r1, c1) = np.argwhere(frame).min(0), np.argwhere(frame).max(0)
            assert (frame[r0:r1 + 1, c0:c1 + 1] == images[i]).all()
            corners.append((r0, c0))
        steps = np.abs(np.diff(corners, axis=0))
        assert steps.max() <= 2 + 1  # at most `speed` high (2) per frame, plus rounding
        moved += len(set(corners)) > 1
    assert moved == len(videos)  # speed >= 1 over 7 frames: every garment moves
    again, again_ids = moving_fashion_mnist(images, labels, 10, frames=7, size=40, seed=5)
    assert (again == videos).all() and (again_ids == ids).all()
    other, _ = moving_fashion_mnist(images, labels, 10, frames=7, size=40, seed=6)
    assert (other != videos).any()
    few, few_ids = moving_fashion_mnist(images, labels, 4, frames=2, size=24, seed=0)
    assert len(set(few_ids.tolist())) == 4  # fewer videos than garments: no repeats


@pytest.mark.parametrize("kw, match", [
    (dict(size=27), "at least 28"),
    (dict(num_videos=0), "at least 1"),
    (dict(frames=0), "at least 1"),
    (dict(speed=(2.0, 1.0)), "speed"),
    (dict(labels=np.arange(3)), "need 4 labels"),
    (dict(images=np.zeros((4, 28, 28), np.float32)), "uint8"),
])
def test_moving_fashion_mnist_refuses(kw, match):
    images, labels = unique_garments(4)
    args = dict(images=images, labels=labels, num_videos=2)
    args.update(kw)
    with pytest.raises(FlexDiTError, match=match):
        moving_fashion_mnist(**args)


def test_fashion_mnist_videos_from_idx_files(tmp_path):
    images, labels = blob_images(12)
    write_idx(tmp_path, "t10k", images, labels)
    videos, ids = fashion_mnist_videos(tmp_path, 5, split="test", frames=3, seed=2)
    expected, expected_ids = moving_fashion_mnist(images, labels, 5, frames=3, seed=2)
    assert (videos == expected).all() and (ids == expected_ids).all()
    info = write_fashion_mnist_videos(tmp_path, tmp_path / "out" / "videos.npz", 5, split="test", frames=3, seed=2)
    assert info["num_videos"] == 5
    data = open_video_dataset(info["path"])
    assert isinstance(data, VideoNpzData) and data.class_names == list(FASHION_MNIST_CLASS_NAMES)
    assert data.num_classes == 10 and data.sample_shape == (1, 3, 32, 32)
    x, y = data.batch(torch.arange(5))
    assert (y.numpy() == expected_ids).all() and torch.equal(x, torch.from_numpy(expected).unsqueeze(1) / 127.5 - 1)
    with pytest.raises(FlexDiTError, match="no Fashion-MNIST train split"):
        fashion_mnist_videos(tmp_path, 2)
    with pytest.raises(FlexDiTError, match="unknown split"):
        fashion_mnist_videos(tmp_path, 2, split="val")
    with pytest.raises(FlexDiTError, match="Fashion-MNIST images, not videos"):
        open_video_dataset(tmp_path)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="no Fashion-MNIST copy")
def test_real_fashion_mnist_garments_stay_whole():
    videos, ids = fashion_mnist_videos(FMNIST, 3, split="test", frames=4)
    assert videos.shape == (3, 4, 32, 32) and set(ids.tolist()) <= set(range(10))
    sums = videos.reshape(3, 4, -1).sum(-1, dtype=np.int64)
    assert (sums == sums[:, :1]).all()  # the same garment, whole, in every frame


# --- npz videos -----------------------------------------------------------------------------------------
def pixels_of(videos: np.ndarray) -> torch.Tensor:
    """uint8 (N, F, H, W, C) -> the expected (N, C, F, H, W) in [-1, 1], computed frame by frame."""
    return torch.stack([torch.stack([torch.from_numpy(f.copy()).permute(2, 0, 1).float() / 127.5 - 1
                                     for f in v], dim=1) for v in videos])


@pytest.mark.parametrize("channels, writer", [(1, "ours"), (3, "ours"), (1, "compressed"), (3, "positional")])
def test_npz_videos(tmp_path, channels, writer):
    videos, labels = random_videos(4, 7, 6, 5, channels), np.array([2, 0, 1, 2])
    path = tmp_path / "v.npz"
    stored = videos[..., 0] if channels == 1 else videos  # grey as (N, F, H, W)
    if writer == "ours":
        write_video_npz(path, stored, labels, ["a", "b", "c"])
    elif writer == "compressed":
        np.savez_compressed(path, videos=stored, labels=labels.astype(np.uint8))
    else:
        np.savez(path, stored, labels)  # arr_0, arr_1
    data = open_video_dataset(path)
    assert isinstance(data, VideoNpzData) and len(data) == 4 and data.num_classes == 3 and data.can_flip
    assert data.class_names == (["a", "b", "c"] if writer == "ours" else None)
    assert data.sample_shape == (channels, 7, 6, 5) and data.vae_path is None
    assert isinstance(data.videos, np.memmap) == (writer != "compressed")
    idx, flip = torch.tensor([3, 0, 2]), torch.tensor([True, False, True])
    x, y = data.batch(idx)
    expected = pixels_of(videos[idx.numpy()])
    assert x.dtype == torch.float32 and torch.equal(x, expected) and y.tolist() == [2, 2, 1]
    flipped, _ = data.batch(idx, flip)
    assert torch.equal(flipped[1], expected[1]) and torch.equal(flipped[[0, 2]], expected[[0, 2]].flip(-1))
    four, _ = open_video_dataset(path, frames=4).batch(idx)  # 7 frames -> 0, 2, 4, 6
    assert four.shape[2] == 4 and torch.equal(four, expected[:, :, [0, 2, 4, 6]])


def test_npz_videos_with_a_vae(tmp_path, vae_dir):
    videos = random_videos(3, 4, 8, 8, 1)
    write_video_npz(tmp_path / "v.npz", videos[..., 0], [0, 1, 0])
    data = open_video_dataset(tmp_path / "v.npz", frames=2, image_size=8, vae=str(vae_dir))
    assert data.sample_shape == (4, 2, 4, 4) and data.vae_path == str(vae_dir)
    idx, flip = torch.tensor([2, 1]), torch.tensor([False, True])
    x, _ = data.batch(idx, flip)
    pixels = pixels_of(videos[idx.numpy()][:, [0, 3]]).repeat(1, 3, 1, 1, 1)  # grey -> RGB, (B, 3, F, H, W)
    pixels[1] = pixels[1].flip(-1)  # the mirrored video, encoded
    vae = load_vae(str(vae_dir))
    for t in range(2):
        torch.testing.assert_close(x[:, :, t], encode_latents(vae, pixels[:, :, t]), rtol=1e-4, atol=1e-5)


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


NPZ_ERRORS = [
    (dict(videos=np.zeros((2, 3, 4, 4), np.float32), labels=[0, 1]), "float32 videos; store them as uint8"),
    (dict(videos=np.zeros((2, 3, 4), np.uint8), labels=[0, 1]), "shape"),
    (dict(videos=np.zeros((2, 3, 4, 4, 2), np.uint8), labels=[0, 1]), "C 1 or 3"),
    (dict(videos=np.zeros((0, 3, 4, 4), np.uint8), labels=np.zeros(0, int)), "N >= 1"),
    (dict(videos=np.zeros((2, 3, 4, 4), np.uint8)), "has no labels"),
    (dict(labels=[0, 1]), "has no videos"),
    (dict(videos=np.zeros((2, 3, 4, 4), np.uint8), labels=[0.0, 1.0]), "float64 labels"),
    (dict(videos=np.zeros((2, 3, 4, 4), np.uint8), labels=[0, 1, 1]), "for 2 videos"),
    (dict(videos=np.zeros((2, 3, 4, 4), np.uint8), labels=[0, -1]), "label -1 outside 0..0; labels count"),
    (dict(videos=np.zeros((2, 3, 4, 4), np.uint8), labels=[0, 2], class_names=["a", "b"]),
     r"label 2 outside 0..1 \(its 2 class names\)"),
    (dict(videos=np.zeros((2, 3, 4, 4), np.uint8), labels=np.array([0, 1], dtype=object)), "Python objects"),
]


@pytest.mark.parametrize("arrays, match", NPZ_ERRORS)
def test_npz_refuses(tmp_path, arrays, match):
    with pytest.raises(FlexDiTError, match=match):
        open_video_dataset(save_npz(tmp_path / "v.npz", **arrays))


def test_npz_refuses_frames_sizes_and_other_files(tmp_path):
    path = save_npz(tmp_path / "v.npz", videos=np.zeros((2, 3, 4, 4), np.uint8), labels=[0, 1])
    with pytest.raises(FlexDiTError, match="too few for frames 5"):
        open_video_dataset(path, frames=5)
    with pytest.raises(FlexDiTError, match="frames must be at least 1"):
        open_video_dataset(path, frames=0)
    with pytest.raises(FlexDiTError, match="frames must be at least 1"):
        VideoNpzData(path, frames=0)
    with pytest.raises(FlexDiTError, match="4x4 frames, not 8x8"):
        open_video_dataset(path, image_size=8)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FlexDiTError, match="is not an npz file"):
        open_video_dataset(tmp_path / "notes.txt")
    (tmp_path / "broken.npz").write_bytes(path.read_bytes()[:60])  # truncated
    with pytest.raises(FlexDiTError, match="cannot read .* as an npz file"):
        open_video_dataset(tmp_path / "broken.npz")
    with zipfile.ZipFile(tmp_path / "junk.npz", "w") as z:
        z.writestr("videos.npy", b"not an array")
    with pytest.raises(FlexDiTError, match="cannot read .* as an npz file"):
        open_video_dataset(tmp_path / "junk.npz")
    with pytest.raises(FlexDiTError, match="video data not found"):
        open_video_dataset(tmp_path / "missing.npz")


# --- frame folders --------------------------------------------------------------------------------------
def write_video(folder: Path, frames: int, size=(12, 10), seed=0) -> list[Path]:
    """`frames` random frames frame1.png ... (W x H = size); returned in time order."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"frame{k + 1}.png" for k in range(frames)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
    return paths


@pytest.fixture
def video_dir(tmp_path) -> tuple[Path, list[list[Path]]]:
    """Classes run (id 1) and jump (id 0); 10-frame videos (frame2 sorts before frame10) and one of 4."""
    root = tmp_path / "videos"
    videos = [write_video(root / "jump" / "a", 10, seed=1), write_video(root / "jump" / "b", 4, seed=2),
              write_video(root / "run" / "c", 10, seed=3)]
    return root, videos


def test_video_folder(video_dir):
    root, videos = video_dir
    data = open_video_dataset(root, frames=4, image_size=8)
    assert isinstance(data, VideoFolderData) and len(data) == 3 and data.class_names == ["jump", "run"]
    assert data.num_classes == 2 and data.sample_shape == (3, 4, 8, 8) and data.labels.tolist() == [0, 0, 1]
    x, y = data.batch(torch.tensor([2, 1]), torch.tensor([True, False]))
    taken = {2: [0, 3, 6, 9], 1: [0, 1, 2, 3]}  # evenly spaced over 10 frames; all 4 of the short one
    for b, v in enumerate((2, 1)):
        for t, k in enumerate(taken[v]):
            frame = torch.from_numpy(load_image(videos[v][k], 8)).permute(2, 0, 1).float() / 127.5 - 1
            assert torch.equal(x[b, :, t], frame.flip(-1) if b == 0 else frame)
    assert y.tolist() == [1, 0]


def test_video_folder_with_a_vae(video_dir, vae_dir):
    root, _ = video_dir
    data = VideoFolderData(root, 4, 8, vae=str(vae_dir))
    assert data.sample_shape == (4, 4, 4, 4) and data.vae_path == str(vae_dir)
    idx, flip = torch.tensor([0, 2]), torch.tensor([True, False])
    x, _ = data.batch(idx, flip)
    pixels = data.pixels(idx, flip)
    vae = load_vae(str(vae_dir))
    for t in range(4):
        torch.testing.assert_close(x[:, :, t], encode_latents(vae, pixels[:, :, t]), rtol=1e-4, atol=1e-5)


def test_video_folder_frames_default_to_the_common_count(tmp_path):
    write_video(tmp_path / "only" / "a", 3)
    write_video(tmp_path / "only" / "b", 3, seed=1)
    assert open_video_dataset(tmp_path, image_size=8).sample_shape == (3, 3, 8, 8)


def test_video_folder_refuses(video_dir, tmp_path):
    root, videos = video_dir
    with pytest.raises(FlexDiTError, match="have 4 to 10 frames; give the number"):
        open_video_dataset(root, image_size=8)
    with pytest.raises(FlexDiTError, match=re.escape(f"video {root / 'jump' / 'b'} has 4 frame images (")):
        open_video_dataset(root, frames=5, image_size=8)
    with pytest.raises(FlexDiTError, match="give a positive image size"):
        open_video_dataset(root, frames=4)
    with pytest.raises(FlexDiTError, match="frames must be at least 1"):
        VideoFolderData(root, 0, 8)
    Image.new("RGB", (14, 10)).save(videos[2][6])  # one of the frames taken, of another size
    data = open_video_dataset(root, frames=4, image_size=8)
    mixed = re.escape(f"video {root / 'run' / 'c'} mixes frame sizes: frame1.png is 12x10 but frame7.png 14x10")
    with pytest.raises(FlexDiTError, match=mixed):
        data.batch(torch.tensor([2]))
    videos[0][3].write_bytes(b"not a png")
    with pytest.raises(FlexDiTError, match="cannot read frame .*frame4.png"):
        data.batch(torch.tensor([0]))


@pytest.mark.parametrize("layout, match", [
    ({}, "is empty"),
    ({"x.png": None}, "no class subfolders"),
    ({"cls/x.png": None}, "holds no video folders"),
    ({"cls/v/notes.txt": None}, "has 0 frame images"),
])
def test_video_folder_layout_errors(tmp_path, layout, match):
    root = tmp_path / "data"
    root.mkdir()
    for name in layout:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            Image.new("RGB", (4, 4)).save(root / name)
        else:
            (root / name).write_text("x")
    with pytest.raises(FlexDiTError, match=match):
        open_video_dataset(root, frames=2, image_size=4)


def test_npz_sample_files_are_not_left_half_written(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(FlexDiTError, match="No space left on device"):
        write_video_npz(tmp_path / "v.npz", random_videos(1)[..., 0], [0])
    assert os.listdir(tmp_path) == []


# --- extracted latents ----------------------------------------------------------------------------------
def test_extract_video_latents_reads_back_as_latents_data(tmp_path, vae_dir):
    videos, labels = random_videos(5, 4, 8, 8, 3), np.array([1, 0, 1, 1, 0])
    write_video_npz(tmp_path / "v.npz", videos, labels, ["x", "y"])
    out = tmp_path / "latents"
    meta = extract_video_latents(tmp_path / "v.npz", str(vae_dir), out, frames=2, batch=2, flip=True, shard_size=3,
                                 device="cpu", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["latents-00000.safetensors", "latents-00001.safetensors",
                                                      "meta.json"]
    assert meta["latent_shape"] == [4, 2, 4, 4] and meta["frames"] == 2 and meta["num_samples"] == 5
    data = open_dataset(str(out), image_size=8)
    assert isinstance(data, LatentsData) and data.sample_shape == (4, 2, 4, 4) and data.class_names == ["x", "y"]
    source = open_video_dataset(tmp_path / "v.npz", frames=2, vae=str(vae_dir))
    idx, flip = torch.tensor([4, 0, 3]), torch.tensor([True, False, False])
    x, y = data.batch(idx, flip)
    expected, expected_y = source.batch(idx, flip)  # encoded on the fly: the same latents, up to float16
    torch.testing.assert_close(x, expected, rtol=2e-3, atol=2e-4)
    assert y.tolist() == expected_y.tolist() == [0, 1, 1]


def test_extract_video_latents_refuses(tmp_path, vae_dir):
    write_video_npz(tmp_path / "wide.npz", random_videos(2, 3, 8, 6, 3), [0, 1])
    with pytest.raises(FlexDiTError, match="8x6 frames; latents are extracted from square frames"):
        extract_video_latents(tmp_path / "wide.npz", str(vae_dir), tmp_path / "out", device="cpu")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(FlexDiTError, match="not empty and not a flexdit-latents folder"):
        extract_video_latents(tmp_path / "wide.npz", str(vae_dir), tmp_path / "full", device="cpu")
    with pytest.raises(FlexDiTError, match="at least 1"):
        extract_video_latents(tmp_path / "wide.npz", str(vae_dir), tmp_path / "out", batch=0)
    assert not (tmp_path / "out").exists()

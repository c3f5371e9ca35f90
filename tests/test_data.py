"""Training data sources and `flexdit extract-latents`, on a tiny random VAE and images built here."""
import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flexdit.cli import main
from flexdit.errors import FlexDiTError
from flexdit.vae import LATENT_SCALE, load_vae
from flexdit.training.data import (FashionMNISTData, ImageFolderData, LatentsData, center_crop_arr, load_image,
                                   open_dataset)

from conftest import cli_fails, idx_bytes, write_idx

CLASSES = ("cat", "ant", "bee")  # sorted: ant 0, bee 1, cat 2
SIZE = 16
HALF = dict(rtol=2e-3, atol=2e-4)  # float16 storage; encoding in other batch sizes may round differently


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=SIZE)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """3 classes x 3 random 24x20 (W x H) images; one JPEG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir()
        for k in range(3):
            image = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
            image.save(root / name / (f"{k}.jpg" if (name, k) == ("bee", 1) else f"{k}.png"))
    return root


def expected_labels() -> list[int]:
    return [i for i in range(len(CLASSES)) for _ in range(3)]


def encode_directly(vae_dir, pixels: torch.Tensor) -> torch.Tensor:
    vae = load_vae(str(vae_dir))
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean * LATENT_SCALE


def extract(capsys, image_dir, vae_dir, out, *extra) -> str:
    main([str(a) for a in ("extract-latents", "--images", image_dir, "--vae", vae_dir, "--out", out,
                           "--image-size", SIZE, "--device", "cpu", *extra)])
    return capsys.readouterr().out


# --- precomputed latents --------------------------------------------------------------------------------
def test_extract_latents_end_to_end(capsys, tmp_path, image_dir, vae_dir):
    out = tmp_path / "latents"
    # batch 3 and shard size 4: batches are cut at shard boundaries, the last shard holds one image
    printed = extract(capsys, image_dir, vae_dir, out, "--batch", 3, "--shard-size", 4, "--flip")
    assert printed.startswith("wrote 9 latents 4x16x16 (3 classes, with mirrored images)") and printed.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["latents-00000.safetensors", "latents-00001.safetensors",
                                                      "latents-00002.safetensors", "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "flexdit-latents" and meta["latent_shape"] == [4, SIZE, SIZE]
    assert meta["classes"] == sorted(CLASSES) and meta["num_samples"] == 9 and meta["flip"] is True

    data = open_dataset(str(out), image_size=SIZE, vae=str(vae_dir))  # vae is not needed, and ignored
    assert isinstance(data, LatentsData) and len(data) == 9 and data.can_flip
    assert data.num_classes == 3 and data.sample_shape == (4, SIZE, SIZE) and data.vae_path == meta["vae"]
    x, y = data.batch(torch.arange(9))
    assert x.dtype == torch.float32 and x.shape == (9, 4, SIZE, SIZE)
    assert y.dtype == torch.int64 and y.tolist() == expected_labels()

    pixels = ImageFolderData(image_dir, SIZE).pixels(torch.arange(9))
    want = encode_directly(vae_dir, pixels)
    want_flipped = encode_directly(vae_dir, pixels.flip(-1))
    torch.testing.assert_close(x, want, **HALF)
    assert not torch.allclose(want_flipped, want.flip(-1), atol=1e-2)  # why flips must be stored
    flip = torch.tensor([True, False] * 4 + [True])
    x, _ = data.batch(torch.arange(9), flip)
    torch.testing.assert_close(x, torch.where(flip.view(-1, 1, 1, 1), want_flipped, want), **HALF)
    x, y = data.batch(torch.tensor([8, 0]))
    torch.testing.assert_close(x, want[[8, 0]], **HALF)
    assert y.tolist() == [2, 0]


def test_latents_are_read_from_the_shard_files_when_a_batch_asks(capsys, tmp_path, image_dir, vae_dir):
    """Memory-mapped, not loaded: every process reads only its batches' rows (through the shared page cache)."""
    out = tmp_path / "latents"
    extract(capsys, image_dir, vae_dir, out, "--shard-size", 4, "--flip")
    data = open_dataset(str(out))
    before, _ = data.batch(torch.tensor([5, 0]))
    path = out / "latents-00001.safetensors"  # sample 5 is row 1 of the second shard
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")  # safetensors: header length, JSON header, data
    start = 8 + size + json.loads(raw[8:8 + size])["latents"]["data_offsets"][0]
    row = 4 * SIZE * SIZE * 2  # bytes of one float16 latent
    with path.open("r+b") as f:  # rewritten on disk after the folder was opened
        f.seek(start + row)
        f.write(np.full(4 * SIZE * SIZE, 7, dtype=np.float16).tobytes())
    after, _ = data.batch(torch.tensor([5, 0]))
    assert (after[0] == 7).all() and not (before[0] == 7).all() and torch.equal(after[1], before[1])
    flipped, _ = data.batch(torch.tensor([5]), torch.tensor([True]))  # mirrored rows come from latents_flip
    assert not (flipped == 7).all()


def test_latents_without_flips_refuse_flip_and_rerun_overwrites(capsys, tmp_path, image_dir, vae_dir):
    out = tmp_path / "latents"
    extract(capsys, image_dir, vae_dir, out, "--shard-size", 4, "--flip")
    extract(capsys, image_dir, vae_dir, out)  # a previous extraction is overwritten; its extra shards go
    assert sorted(p.name for p in out.iterdir()) == ["latents-00000.safetensors", "meta.json"]
    data = open_dataset(str(out))
    assert not data.can_flip and len(data) == 9
    x, _ = data.batch(torch.arange(3), torch.zeros(3, dtype=torch.bool))
    assert x.shape == (3, 4, SIZE, SIZE)
    with pytest.raises(FlexDiTError, match="--flip"):
        data.batch(torch.arange(3), torch.tensor([False, True, False]))


def test_image_folder_encoded_on_the_fly_matches_extraction(capsys, tmp_path, image_dir, vae_dir):
    extract(capsys, image_dir, vae_dir, tmp_path / "latents", "--flip")
    stored = open_dataset(str(tmp_path / "latents"))
    live = open_dataset(str(image_dir), image_size=SIZE, vae=str(vae_dir))
    assert isinstance(live, ImageFolderData) and live.sample_shape == (4, SIZE, SIZE) and live.can_flip
    indices, flip = torch.tensor([4, 1, 7]), torch.tensor([True, False, True])
    x_live, y_live = live.batch(indices, flip)
    x_stored, y_stored = stored.batch(indices, flip)
    torch.testing.assert_close(x_live, x_stored, **HALF)
    assert y_live.tolist() == y_stored.tolist() == [1, 0, 2]


def test_extract_latents_errors(capsys, tmp_path, image_dir, vae_dir):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    err = cli_fails(capsys, "extract-latents", "--images", image_dir, "--vae", vae_dir, "--out", foreign,
                "--image-size", SIZE, "--device", "cpu")
    assert "not empty and not a flexdit-latents folder" in err and (foreign / "todo.txt").exists()
    err = cli_fails(capsys, "extract-latents", "--images", tmp_path / "nowhere", "--vae", vae_dir, "--out",
                tmp_path / "out", "--image-size", SIZE)
    assert "not found" in err
    err = cli_fails(capsys, "extract-latents", "--images", image_dir, "--vae", tmp_path, "--out", tmp_path / "out",
                "--image-size", SIZE)
    assert "config.json" in err


OUTPUT_CASES = [  # (name, --out relative to a folder holding "file" and the images, key words)
    ("a file", "file", ["--out", "is a file"]),
    ("inside a file", "file/latents", ["--out", "lies inside the file"]),
    ("inside the images", "images/latents", ["--out", "lies inside --images"]),
]


@pytest.mark.parametrize("out, words", [c[1:] for c in OUTPUT_CASES], ids=[c[0] for c in OUTPUT_CASES])
def test_extract_latents_checks_its_output_before_any_work(capsys, tmp_path, image_dir, out, words):
    shutil.copytree(image_dir, tmp_path / "images")
    (tmp_path / "file").write_text("keep me")
    # the VAE does not exist: the output is refused before the images are scanned or the VAE is loaded
    err = cli_fails(capsys, "extract-latents", "--images", tmp_path / "images", "--vae", tmp_path / "no-vae",
                    "--out", tmp_path / out, "--image-size", SIZE, "--device", "cpu")
    assert all(word in err for word in words) and "Traceback" not in err, err
    assert (tmp_path / "file").read_text() == "keep me" and not (tmp_path / "images" / "latents").exists()


def test_latents_folder_errors(capsys, tmp_path, image_dir, vae_dir):
    out = tmp_path / "latents"
    extract(capsys, image_dir, vae_dir, out, "--shard-size", 4)
    meta = json.loads((out / "meta.json").read_text())

    def with_meta(**changes):
        (out / "meta.json").write_text(json.dumps({**meta, **changes}))

    with pytest.raises(FlexDiTError, match="holds latents of 16 px images, not 32"):
        open_dataset(str(out), image_size=32)
    with_meta(format="something-else")
    with pytest.raises(FlexDiTError, match="not a flexdit-latents file"):
        open_dataset(str(out))
    with_meta(latent_shape=[4, 8, 8])
    with pytest.raises(FlexDiTError, match="latents-00000.safetensors holds"):
        open_dataset(str(out))
    with_meta(flip=True)
    with pytest.raises(FlexDiTError, match="with latents_flip"):
        open_dataset(str(out))
    with_meta(num_samples=10)
    with pytest.raises(FlexDiTError, match="shards hold 9 samples but meta.json says 10"):
        open_dataset(str(out))
    with_meta(num_classes=2)
    with pytest.raises(FlexDiTError, match="label 2 outside the 2 classes"):
        open_dataset(str(out))
    with_meta()
    shard = (out / "latents-00000.safetensors").read_bytes()
    (out / "latents-00000.safetensors").write_bytes(shard[:-10])
    with pytest.raises(FlexDiTError, match="cannot read shard .* truncated"):
        open_dataset(str(out))
    (out / "latents-00000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FlexDiTError, match="cannot read shard"):
        open_dataset(str(out))
    (out / "latents-00001.safetensors").unlink()
    with pytest.raises(FlexDiTError, match="should hold shards"):
        open_dataset(str(out))
    (out / "meta.json").write_text("{")
    with pytest.raises(FlexDiTError, match="cannot read"):
        open_dataset(str(out))


# --- image folders --------------------------------------------------------------------------------------
def test_image_folder_pixels(image_dir):
    data = open_dataset(str(image_dir), image_size=SIZE)
    assert isinstance(data, ImageFolderData) and data.vae_path is None
    assert data.classes == sorted(CLASSES) and data.num_classes == 3 and data.sample_shape == (3, SIZE, SIZE)
    x, y = data.batch(torch.arange(9))
    assert x.dtype == torch.float32 and x.shape == (9, 3, SIZE, SIZE) and x.min() >= -1 and x.max() <= 1
    assert y.tolist() == expected_labels()
    jpeg = data.paths.index(image_dir / "bee" / "1.jpg")
    pixels = load_image(image_dir / "bee" / "1.jpg", SIZE)
    torch.testing.assert_close(x[jpeg], torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)
    flip = torch.tensor([True, False] * 4 + [False])
    x_flip, _ = data.batch(torch.arange(9), flip)
    assert torch.equal(x_flip[flip], x[flip].flip(-1)) and torch.equal(x_flip[~flip], x[~flip])


def test_center_crop_follows_adm():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))  # 24 wide, 20 high
    crop = center_crop_arr(image, SIZE)
    assert crop.shape == (SIZE, SIZE, 3) and crop.dtype == np.uint8
    resized = np.asarray(image.resize((19, 16), resample=Image.BICUBIC))  # short side 20 -> 16, 24 -> 19
    np.testing.assert_array_equal(crop, resized[:, 1:17])  # (19 - 16) // 2 = 1 column cut on the left

    big = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # short side 40 >= 2 * 16
    halved = big.resize((24, 20), resample=Image.BOX)
    np.testing.assert_array_equal(center_crop_arr(big, SIZE), center_crop_arr(halved, SIZE))
    direct = np.asarray(big.resize((19, 16), resample=Image.BICUBIC))[:, 1:17]
    assert not np.array_equal(center_crop_arr(big, SIZE), direct)


def test_image_folder_errors(tmp_path, image_dir):
    with pytest.raises(FlexDiTError, match="give --image-size"):
        open_dataset(str(image_dir))
    with pytest.raises(FlexDiTError, match="data folder .* is empty"):
        open_dataset(str(tmp_path))
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(FlexDiTError, match="no class subfolders"):
        open_dataset(str(tmp_path), image_size=SIZE)
    (tmp_path / "loose.png").unlink()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FlexDiTError, match="not a data folder"):
        open_dataset(str(tmp_path), image_size=SIZE)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(FlexDiTError, match="class folder.* a, b .* hold no images"):
        open_dataset(str(tmp_path), image_size=SIZE)
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"definitely not a png")
    data = open_dataset(str(tmp_path), image_size=SIZE)  # files are read when a batch asks for them
    data.batch(torch.tensor([0]))
    with pytest.raises(FlexDiTError, match="cannot read image .*broken.png"):
        data.batch(torch.tensor([0, 1]))
    with pytest.raises(FlexDiTError, match="not found"):
        open_dataset(str(tmp_path / "missing"))
    with pytest.raises(FlexDiTError, match="is a file"):
        open_dataset(str(tmp_path / "readme.txt"))
    with pytest.raises(FlexDiTError, match="Fashion-MNIST only"):
        open_dataset(str(tmp_path), image_size=SIZE, split="test")


# --- Fashion-MNIST --------------------------------------------------------------------------------------
@pytest.fixture
def fashion(tmp_path):
    """5 train images (gzip) and 2 test images (raw)."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.array([3, 0, 9, 1, 3], dtype=np.uint8)
    write_idx(tmp_path, "train", images, labels, gz=True)
    write_idx(tmp_path, "t10k", images[:2][:, ::-1], np.array([7, 8], dtype=np.uint8), gz=False)
    return tmp_path, images, labels


def test_fashion_mnist(fashion):
    folder, images, labels = fashion
    data = open_dataset(str(folder), image_size=32)
    assert isinstance(data, FashionMNISTData) and len(data) == 5 and data.num_classes == 10
    assert data.sample_shape == (1, 32, 32) and data.vae_path is None
    x, y = data.batch(torch.arange(5))
    assert x.dtype == torch.float32 and x.shape == (5, 1, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    inner = x[:, 0, 2:30, 2:30]
    assert torch.equal(inner, torch.from_numpy(images).float() / 127.5 - 1)
    assert inner[0, 0, 0] == -1 and inner[0, 0, 1] == 1  # 0 -> -1 and 255 -> 1, exactly
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == -1).all()
    flip = torch.tensor([True, False, True, False, False])
    x_flip, _ = data.batch(torch.arange(5), flip)
    assert torch.equal(x_flip[flip], x[flip].flip(-1)) and torch.equal(x_flip[~flip], x[~flip])

    test = open_dataset(str(folder), split="test")  # raw (not gzip) files
    x_test, y_test = test.batch(torch.arange(2))
    assert len(test) == 2 and y_test.tolist() == [7, 8]
    assert torch.equal(x_test[:, 0, 2:30, 2:30], torch.from_numpy(images[:2][:, ::-1].copy()).float() / 127.5 - 1)


def test_fashion_mnist_errors(fashion):
    folder, images, labels = fashion
    with pytest.raises(FlexDiTError, match="28x28, padded to 32x32"):
        open_dataset(str(folder), image_size=28)
    with pytest.raises(FlexDiTError, match="leave out --vae"):
        open_dataset(str(folder), vae="some-vae")
    with pytest.raises(FlexDiTError, match="unknown split"):
        open_dataset(str(folder), split="val")
    train_images = folder / "train-images-idx3-ubyte.gz"
    train_labels = folder / "train-labels-idx1-ubyte.gz"
    cases = [
        (train_images, gzip.compress(idx_bytes(2049, images)), "magic number 2049, expected 2051"),
        (train_images, gzip.compress(idx_bytes(2051, images)[:-10]), "truncated or corrupt"),
        (train_images, gzip.compress(idx_bytes(2051, images[:, :27])), "27x28 images"),
        (train_images, b"\x1f\x8b garbage", "cannot read"),
        (train_labels, gzip.compress(idx_bytes(2049, labels[:4])), "5 images but .* 4 labels"),
        (train_labels, gzip.compress(idx_bytes(2049, np.array([1, 2, 3, 4, 10]))), "label 10"),
        (train_labels, gzip.compress(b"\0\0"), "too short"),
    ]
    for path, content, message in cases:
        good = path.read_bytes()
        path.write_bytes(content)
        with pytest.raises(FlexDiTError, match=message):
            open_dataset(str(folder))
        path.write_bytes(good)
    open_dataset(str(folder))
    (folder / "t10k-labels-idx1-ubyte").unlink()
    open_dataset(str(folder))  # only the split asked for must be complete
    with pytest.raises(FlexDiTError, match="lacks t10k-labels-idx1-ubyte"):
        open_dataset(str(folder), split="test")
    (folder / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FlexDiTError, match="no test split"):
        open_dataset(str(folder), split="test")

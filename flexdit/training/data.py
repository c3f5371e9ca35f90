"""Training data sources: precomputed VAE latents, an image folder (pixels or VAE on the fly), Fashion-MNIST.

Every source answers the same two questions the trainer asks: what one sample looks like (`sample_shape`,
`num_classes`) and `batch(indices, flip)`. The sources hold no randomness: which samples, and which of them
are mirrored, is the trainer's choice from its own seeded generator, so a resumed run sees the same data.
"""
import gzip
import json
import math
import zlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from flexdit.errors import FlexDiTError
from flexdit.vae import LATENT_SCALE, load_vae

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENTS_FORMAT = "flexdit-latents"
META_FILE = "meta.json"
SHARD_NAME = "latents-{:05d}.safetensors"
META_KEYS = ("image_size", "latent_shape", "num_classes", "scale", "vae", "flip", "num_samples")
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC = 2051, 2049
FASHION_MNIST_SIDE, FASHION_MNIST_PADDED, FASHION_MNIST_CLASSES = 28, 32, 10
FASHION_MNIST_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                             "Bag", "Ankle boot")  # in label order
SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
SHARD_DTYPES = {"latents": np.float16, "labels": np.int64, "latents_flip": np.float16}  # as extract-latents writes


class TrainData(ABC):
    """What the trainer sees of a data source.

    batch(indices, flip) -> x float32 (B, C, H, W) in the model's input space, y int64 (B,), on `device`
    (CPU except for an image folder encoded by a VAE on a GPU). `flip` (bool (B,)) asks for the mirrored
    sample where True; sources with can_flip False refuse it.
    """
    num_classes: int
    class_names: list[str] | None = None  # in label order, where the source names its classes
    sample_shape: tuple[int, ...]  # (C, H, W); video sources (training/video_data.py): (C, F, H, W)
    can_flip: bool = True
    vae_path: str | None = None  # the VAE that turns x into images; None for pixel space
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batch(self, indices: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


def mirror(x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, H, W) with the samples where flip (B,) is True mirrored left-right."""
    if flip is None:
        return x
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


# --- precomputed latents --------------------------------------------------------------------------------
class LatentsData(TrainData):
    """A folder written by `flexdit extract-latents`: meta.json + latents-NNNNN.safetensors shards.

    Encoding once and training on the stored latents (the fast-DiT recipe) takes the VAE out of every step.
    The shards are memory-mapped, not loaded: a batch reads only its own rows, and the processes of a machine
    share one copy through the page cache (ImageNet-256 with flips is ~21 GB). Only the labels are held.
    Samples are indexed by global position. Mirrored samples are stored latents of mirrored images
    (`latents_flip`), because mirroring a latent is not the same as encoding the mirrored image.
    """

    def __init__(self, folder: Path, image_size: int | None = None):
        meta = read_meta(folder)
        if image_size is not None and image_size != meta["image_size"]:
            raise FlexDiTError(f"{folder} holds latents of {meta['image_size']} px images, not {image_size}; "
                               f"use --image-size {meta['image_size']} or extract again at {image_size}")
        if not math.isclose(meta["scale"], LATENT_SCALE):
            raise FlexDiTError(f"{folder} holds latents scaled by {meta['scale']} but flexdit decodes with "
                               f"{LATENT_SCALE}; extract them again with flexdit extract-latents")
        self.num_classes = int(meta["num_classes"])
        self.class_names = meta.get("classes")  # the image folder's subfolders, recorded by extract-latents
        self.sample_shape = tuple(int(s) for s in meta["latent_shape"])
        self.can_flip = bool(meta["flip"])
        self.vae_path = meta["vae"]
        self.latents, self.labels, self.flipped = _map_shards(folder, meta)
        bad = (self.labels < 0) | (self.labels >= self.num_classes)
        if bad.any():
            raise FlexDiTError(f"{folder} has label {int(self.labels[bad][0])} outside the {self.num_classes} "
                               "classes of meta.json; extract the latents again")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices, flip=None):
        flip = torch.zeros(len(indices), dtype=torch.bool) if flip is None else flip
        if flip.any() and self.flipped is None:
            raise FlexDiTError("these latents were extracted without mirrored images; extract them again "
                               "with --flip, or train without flips")
        x = torch.empty((len(indices), *self.sample_shape))  # (B, C, H, W) float32
        for source, rows in ((self.latents, ~flip), (self.flipped, flip)):
            if rows.any():  # each sample is read from the one array it needs
                x[rows] = source.rows(indices[rows]).float()
        return x, self.labels[indices]


class ShardedRows:
    """Rows of arrays (N_i, ...) split over shards, indexed by global position; reads only the rows asked for."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.numpy()
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), *self.parts[0].shape[1:]), dtype=self.parts[0].dtype)
        for s in np.unique(shard):
            mine = shard == s
            out[mine] = self.parts[s][idx[mine] - self.starts[s]]
        return torch.from_numpy(out)


def read_meta(folder: Path) -> dict:
    """meta.json of a latents folder, checked to be ours and complete."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise FlexDiTError(f"cannot read {folder / META_FILE}: {e}; extract the latents again") from None
    if not isinstance(meta, dict) or meta.get("format") != LATENTS_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise FlexDiTError(f"{folder / META_FILE} is not a {LATENTS_FORMAT} file (format {found!r}); give a "
                           "folder written by flexdit extract-latents, an image folder or Fashion-MNIST")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise FlexDiTError(f"{folder / META_FILE} lacks {', '.join(missing)}; extract the latents again")
    return meta


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(SHARD_NAME.replace("{:05d}", "*")))


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file, memory-mapped read-only (the format: an 8-byte little-endian header
    length, a JSON header of dtype, shape and data offsets per array, then the data)."""
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        size = int(raw[:8].view("<u8")[0])
        header = json.loads(bytes(raw[8:8 + size]))
        arrays = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{key} is {info['dtype']}, not one of {', '.join(SAFETENSORS_DTYPES)}")
            dtype, shape = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
            begin, end = (8 + size + offset for offset in info["data_offsets"])
            if end > len(raw) or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{key} lies outside the file: it is truncated")
            arrays[key] = np.frombuffer(raw, dtype, math.prod(shape), begin).reshape(shape)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FlexDiTError(f"cannot read shard {path}: {e}; extract the latents again") from None
    return arrays


def _map_shards(folder: Path, meta: dict) -> tuple[ShardedRows, torch.Tensor, ShardedRows | None]:
    """(latents (N, C, H, W) f16, labels (N,) i64, mirrored latents or None), checked against meta.json."""
    files = shard_files(folder)
    expected = [folder / SHARD_NAME.format(i) for i in range(len(files))]
    if not files or files != expected:
        raise FlexDiTError(f"{folder} should hold shards {SHARD_NAME.format(0)}, {SHARD_NAME.format(1)}, ... "
                           f"but has {[f.name for f in files] or 'none'}; extract the latents again")
    shape = tuple(meta["latent_shape"])
    keys = ("latents", "labels") + (("latents_flip",) if meta["flip"] else ())
    shards = []
    for f in files:
        arrays = map_safetensors(f)
        n = len(arrays["labels"]) if "labels" in arrays else 0
        want = {"latents": (n, *shape), "labels": (n,), "latents_flip": (n, *shape)}
        found = {k: (a.dtype.name, list(a.shape)) for k, a in arrays.items()}
        if set(arrays) != set(keys) or any(arrays[k].shape != want[k] or arrays[k].dtype != SHARD_DTYPES[k]
                                           for k in keys):
            raise FlexDiTError(f"shard {f.name} holds {found}, but meta.json says float16 latents of shape "
                               f"{list(shape)} {'with' if meta['flip'] else 'without'} latents_flip; "
                               "extract the latents again")
        shards.append(arrays)
    total = sum(len(a["labels"]) for a in shards)
    if total != meta["num_samples"]:
        raise FlexDiTError(f"{folder} shards hold {total} samples but meta.json says {meta['num_samples']}; "
                           "a shard is missing or stale: extract the latents again")
    labels = torch.from_numpy(np.concatenate([a["labels"] for a in shards]))
    latents, flipped = (ShardedRows([a[k] for a in shards]) if k in keys else None for k in ("latents", "latents_flip"))
    return latents, labels, flipped


# --- image folders --------------------------------------------------------------------------------------
def center_crop_arr(image, size: int) -> np.ndarray:
    """ADM's (and DiT's) crop: PIL image -> (size, size, C) uint8.

    BOX-halve while the short side is at least 2 * size (cheap, alias-free), BICUBIC-resize the short side to
    `size`, then crop the centre."""
    from PIL import Image

    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path: Path, size: int) -> np.ndarray:
    """One image file -> (size, size, 3) uint8, cropped as ADM does."""
    try:
        from PIL import Image
    except ImportError:
        raise FlexDiTError("image folders are read with Pillow: pip install Pillow") from None
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FlexDiTError(f"cannot read image {path}: {e}; remove or replace the file") from None
    return center_crop_arr(rgb, size)


def vae_latent_shape(vae, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the latents an AutoencoderKL makes from image_size images."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise FlexDiTError(f"--image-size {image_size} is not divisible by {factor}, the VAE's downsampling; "
                           f"use a multiple of {factor}")
    return (vae.config.latent_channels, image_size // factor, image_size // factor)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w) float32: the posterior MEAN times LATENT_SCALE.

    The mean rather than a posterior sample keeps the data deterministic (stored latents could not be
    resampled anyway); the SD VAE's posterior std is small next to the diffusion noise, so little is lost."""
    mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean  # a strided view into the moments
    return mean.float().contiguous() * LATENT_SCALE


class ImageFolderData(TrainData):
    """One subfolder per class (ids = sorted folder names), images centre-cropped to image_size, RGB, in [-1, 1].

    Without a VAE the samples are pixels (3, size, size). With one they are encoded on the fly (see
    encode_latents) on `device`; a mirrored sample is the mirrored image, encoded. Files are read when a
    batch asks for them, decoded on a thread pool (Pillow releases the GIL while decoding and resizing)."""

    def __init__(self, folder: Path, image_size: int | None, vae: str | None = None, device="cpu",
                 labels_only: bool = False):
        if labels_only:  # the classes and labels, for captions: no crop size, no VAE
            self.classes, self.paths, labels = scan_image_folder(folder)
            self.labels, self.num_classes, self.class_names = torch.tensor(labels), len(self.classes), self.classes
            return
        if image_size is None:
            raise FlexDiTError(f"{folder} is an image folder: give --image-size (the side images are cropped to)")
        if image_size < 1:
            raise FlexDiTError(f"--image-size must be positive, got {image_size}")
        self.image_size = image_size
        self.classes, self.paths, labels = scan_image_folder(folder)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes = len(self.classes)
        self.class_names = self.classes
        self.vae = None
        self.sample_shape = (3, image_size, image_size)
        if vae is not None:
            self.vae = load_vae(vae, device)
            self.vae_path = vae
            self.device = self.vae.device
            self.sample_shape = vae_latent_shape(self.vae, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, indices: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, size, size) float32 in [-1, 1]."""
        paths = [self.paths[i] for i in indices.tolist()]
        with ThreadPoolExecutor() as pool:
            images = np.stack(list(pool.map(lambda p: load_image(p, self.image_size), paths)))  # (B, H, W, 3)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return mirror(x, flip)

    def batch(self, indices, flip=None):
        x = self.pixels(indices, flip)
        if self.vae is not None:
            x = encode_latents(self.vae, x)
        return x, self.labels[indices].to(x.device)


def scan_image_folder(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    """(class names, image paths, class ids): classes are the sorted subfolders, images found recursively."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FlexDiTError(f"{folder} has no class subfolders; put the images in one subfolder per class "
                           "(a single subfolder for unconditional data)")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            empty.append(name)
        paths += found
        labels += [label] * len(found)
    if empty:
        raise FlexDiTError(f"class folder(s) {', '.join(empty[:5])} in {folder} hold no images "
                           f"({'/'.join(IMAGE_EXTENSIONS)}); add images or remove the folders")
    return classes, paths, labels


# --- Fashion-MNIST --------------------------------------------------------------------------------------
def idx_paths(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) idx files of a split, raw or .gz; None if the folder holds neither."""
    found = []
    for name in IDX_FILES[split]:
        candidates = [folder / name, folder / f"{name}.gz"]
        found.append(next((p for p in candidates if p.is_file()), None))
    if found == [None, None]:
        return None
    if None in found:
        missing = IDX_FILES[split][found.index(None)]
        raise FlexDiTError(f"{folder} lacks {missing}(.gz) next to {found[0] or found[1]}; add the file")
    return found[0], found[1]


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (big-endian int32 magic, sizes, then uint8 data) -> uint8 array of those sizes."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise FlexDiTError(f"cannot read {path}: {e}; download the file again") from None
    dims = 3 if magic == IDX_IMAGE_MAGIC else 1
    header = 4 * (1 + dims)
    if len(raw) < header:
        raise FlexDiTError(f"{path} is too short for an idx file; download it again")
    found_magic, *sizes = np.frombuffer(raw, dtype=">i4", count=1 + dims).tolist()
    if found_magic != magic:
        raise FlexDiTError(f"{path} has magic number {found_magic}, expected {magic} "
                           f"({'images' if dims == 3 else 'labels'}); check the file names or download again")
    if len(raw) - header != math.prod(sizes):
        raise FlexDiTError(f"{path} holds {len(raw) - header} bytes of data but its header says {sizes}; "
                           "the file is truncated or corrupt, download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(sizes)


class FashionMNISTData(TrainData):
    """Fashion-MNIST idx files: 1-channel 28x28 pixels padded to 32x32 with background, scaled to [-1, 1].

    32 (= 28 + 2 per side) divides by 2, 4 and 8, so the usual patch sizes and pooled grids fit."""
    num_classes = FASHION_MNIST_CLASSES
    class_names = list(FASHION_MNIST_CLASS_NAMES)
    sample_shape = (1, FASHION_MNIST_PADDED, FASHION_MNIST_PADDED)

    def __init__(self, images_path: Path, labels_path: Path, image_size: int | None = None):
        if image_size not in (None, FASHION_MNIST_PADDED):
            raise FlexDiTError(f"Fashion-MNIST is 28x28, padded to {FASHION_MNIST_PADDED}x{FASHION_MNIST_PADDED}; "
                               f"use --image-size {FASHION_MNIST_PADDED} or leave it out")
        images, labels = read_idx(images_path, IDX_IMAGE_MAGIC), read_idx(labels_path, IDX_LABEL_MAGIC)
        side = FASHION_MNIST_SIDE
        if images.shape[1:] != (side, side):
            raise FlexDiTError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images; Fashion-MNIST's "
                               f"are {side}x{side}")
        if len(images) != len(labels):
            raise FlexDiTError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; "
                               "use files of the same split")
        if len(labels) and labels.max() >= self.num_classes:
            raise FlexDiTError(f"{labels_path} has label {labels.max()}; Fashion-MNIST has {self.num_classes} classes")
        pad = (FASHION_MNIST_PADDED - side) // 2
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))  # background is 0
        self.images = torch.from_numpy(padded).unsqueeze(1)  # (N, 1, 32, 32) uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices, flip=None):
        x = self.images[indices].float() / 127.5 - 1
        return mirror(x, flip), self.labels[indices]


# --- detection ------------------------------------------------------------------------------------------
def open_dataset(path: str, image_size: int | None = None, vae: str | None = None, device="cpu",
                 split: str = "train", labels_only: bool = False) -> TrainData:
    """The data source at `path`, recognised by its contents (`labels_only`: an image folder is opened for its
    classes and labels only, with no crop size):

    meta.json                     -> precomputed latents (image_size, if given, must match; `vae` is not
                                     needed: the folder records its own, see vae_path);
    {train,t10k}-*-idx?-ubyte[.gz] -> Fashion-MNIST (`split` "train" or "test");
    class subfolders of images    -> image folder (image_size required; `vae` encodes on the fly on `device`).
    """
    folder = Path(path)
    if not folder.exists():
        raise FlexDiTError(f"data path not found: {path}; give a latents folder, an image folder or Fashion-MNIST")
    if not folder.is_dir():
        raise FlexDiTError(f"data path {path} is a file; give the folder that holds the data")
    if split not in IDX_FILES:
        raise FlexDiTError(f"unknown split {split!r}; choose {' or '.join(IDX_FILES)}")
    is_idx = any(idx_paths(folder, s) for s in IDX_FILES)
    if split != "train" and not is_idx:
        raise FlexDiTError(f"split {split!r} applies to Fashion-MNIST only; {folder} has one split")
    if (folder / META_FILE).exists():
        return LatentsData(folder, image_size)
    if is_idx:
        if vae is not None:
            raise FlexDiTError("Fashion-MNIST is trained in pixel space; leave out --vae")
        found = idx_paths(folder, split)
        if found is None:
            raise FlexDiTError(f"{folder} has no {split} split ({IDX_FILES[split][0]}); add it or use the other")
        return FashionMNISTData(*found, image_size)
    entries = list(folder.iterdir())
    if any(e.is_dir() for e in entries):
        return ImageFolderData(folder, image_size, vae, device, labels_only)
    if not entries:
        raise FlexDiTError(f"data folder {folder} is empty; put the images in one subfolder per class")
    if any(e.suffix.lower() in IMAGE_EXTENSIONS for e in entries):
        raise FlexDiTError(f"{folder} holds images but no class subfolders; put them in one subfolder per class")
    raise FlexDiTError(f"{folder} is not a data folder: no meta.json (latents), no idx files (Fashion-MNIST) "
                       "and no class subfolders of images")

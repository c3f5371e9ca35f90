"""Video training data: Moving Fashion-MNIST, npz files of uint8 videos, folders of frame images, and their
per-frame VAE latents extracted once (a flexdit-latents folder, which LatentsData reads as for images).

A video source is a TrainData whose samples are (C, F, H, W) (diffusers' layout without the batch): pixels in
[-1, 1], or with a local VAE the per-frame latents (4, F, H/8, W/8) encoded as flexdit.training.data encodes
images. As there, the sources hold no randomness; which videos, and which are mirrored, is the trainer's choice.
"""
import json
import math
import re
import struct
import zipfile
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from flexdit.distributed import resolve_device
from flexdit.errors import FlexDiTError
from flexdit.io import TEMP_PREFIX, atomic_write, check_output_folder, remove_stale_temporaries
from flexdit.training.data import (FASHION_MNIST_CLASS_NAMES, IDX_FILES, IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC,
                                   IMAGE_EXTENSIONS, LATENTS_FORMAT, META_FILE, SHARD_NAME, TrainData, encode_latents,
                                   idx_paths, load_image, read_idx, read_meta, shard_files, vae_latent_shape)
from flexdit.vae import LATENT_SCALE, load_vae

VIDEO_KEYS, LABEL_KEYS, NAMES_KEY = ("videos", "arr_0"), ("labels", "arr_1"), "class_names"
ENCODE_CHUNK = 32  # frames per VAE call: bounds the encoder's activations whatever the batch of videos
ZIP_MAGIC = b"PK\x03\x04"
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # the fixed 30 bytes before a member's name and extra field
SHARD_RE = re.compile(r"latents-\d{5}\.safetensors")


# --- Moving Fashion-MNIST -------------------------------------------------------------------------------
def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, room: int) -> np.ndarray:
    """Integer positions (..., frames) of points moving at `velocity` from `start` in [0, room], reflected at
    both ends (position modulo 2 * room, folded back)."""
    path = start[..., None] + velocity[..., None] * np.arange(frames)  # (..., frames)
    if room == 0:
        return np.zeros(path.shape, dtype=np.int64)
    folded = np.mod(path, 2 * room)
    return np.rint(np.where(folded > room, 2 * room - folded, folded)).astype(np.int64)


def moving_fashion_mnist(images: np.ndarray, labels: np.ndarray, num_videos: int, frames: int = 8, size: int = 32,
                         seed: int = 0, speed: tuple[float, float] = (1.0, 2.0)) -> tuple[np.ndarray, np.ndarray]:
    """(videos uint8 (num_videos, frames, size, size), labels int64 (num_videos,)): in each video one garment of
    `images` (n, h, w) moves on a black canvas from a random position in a random direction at a random speed
    (pixels per frame, uniform in `speed`), bouncing off the borders, so it stays whole in every frame.
    The same seed gives the same videos; garments are drawn without repeats while there are enough."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3 or not len(images):
        found = (images.dtype, images.shape) if isinstance(images, np.ndarray) else type(images).__name__
        raise FlexDiTError(f"images must be a uint8 array (n, h, w) with n >= 1, got {found}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise FlexDiTError(f"{len(images)} images need {len(images)} labels, got labels of shape {labels.shape}")
    n, h, w = images.shape
    if size < max(h, w):
        raise FlexDiTError(f"size {size} is smaller than the {h}x{w} garments; use a size of at least {max(h, w)}")
    if num_videos < 1 or frames < 1:
        raise FlexDiTError(f"num_videos and frames must be at least 1, got {num_videos} and {frames}")
    if not 0 <= speed[0] <= speed[1]:
        raise FlexDiTError(f"speed must be a range (low, high) with 0 <= low <= high, got {speed}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, num_videos, replace=num_videos > n)
    rooms = np.array([size - h, size - w])  # (2,) free pixels along rows and columns
    start = rng.uniform(0, 1, (num_videos, 2)) * rooms  # (V, 2)
    angle, norm = rng.uniform(0, 2 * np.pi, num_videos), rng.uniform(*speed, num_videos)
    velocity = norm[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)  # (V, 2) pixels per frame
    rows, cols = (bounce(start[:, k], velocity[:, k], frames, int(rooms[k])) for k in range(2))  # (V, frames)
    videos = np.zeros((num_videos, frames, size, size), dtype=np.uint8)
    for v, image in enumerate(images[chosen]):
        for t in range(frames):
            videos[v, t, rows[v, t]:rows[v, t] + h, cols[v, t]:cols[v, t] + w] = image
    return videos, labels[chosen].astype(np.int64)


def fashion_mnist_videos(folder: str | Path, num_videos: int, split: str = "train", frames: int = 8, size: int = 32,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """moving_fashion_mnist of the Fashion-MNIST idx files (raw or .gz) of `split` ("train" or "test") in `folder`."""
    if split not in IDX_FILES:
        raise FlexDiTError(f"unknown split {split!r}; choose {' or '.join(IDX_FILES)}")
    found = idx_paths(Path(folder), split)
    if found is None:
        raise FlexDiTError(f"{folder} holds no Fashion-MNIST {split} split ({IDX_FILES[split][0]}[.gz]); give the "
                           "folder of the idx files")
    images, labels = read_idx(found[0], IDX_IMAGE_MAGIC), read_idx(found[1], IDX_LABEL_MAGIC)
    if len(images) != len(labels):
        raise FlexDiTError(f"{found[0]} holds {len(images)} images but {found[1]} {len(labels)} labels; use files "
                           "of the same split")
    return moving_fashion_mnist(images, labels, num_videos, frames, size, seed)


def write_video_npz(path: str | Path, videos: np.ndarray, labels: np.ndarray,
                    class_names: list[str] | tuple[str, ...] | None = None) -> None:
    """videos uint8 (N, F, H, W[, C]) and int labels (N,) (and the class names, in label order) as an uncompressed
    npz, written atomically; VideoNpzData memory-maps it."""
    arrays = {"videos": np.ascontiguousarray(videos), "labels": np.asarray(labels, dtype=np.int64)}
    if class_names is not None:
        arrays[NAMES_KEY] = np.array(list(class_names), dtype=str)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


def write_fashion_mnist_videos(folder: str | Path, path: str | Path, num_videos: int, split: str = "train",
                               frames: int = 8, size: int = 32, seed: int = 0) -> dict:
    """Make Moving Fashion-MNIST from the idx files in `folder` and write it to `path` (write_video_npz, with
    the class names). Returns what was written: {"path", "num_videos", "frames", "size", "seed", "split"}."""
    videos, labels = fashion_mnist_videos(folder, num_videos, split, frames, size, seed)
    write_video_npz(path, videos, labels, FASHION_MNIST_CLASS_NAMES)
    return {"path": str(path), "num_videos": num_videos, "frames": frames, "size": size, "seed": seed,
            "split": split}


# --- shared by the sources ------------------------------------------------------------------------------
def even_frames(available: int, frames: int) -> np.ndarray:
    """`frames` indices spread evenly over 0..available-1, first and last included (all of them if equal)."""
    return np.rint(np.linspace(0, available - 1, frames)).astype(np.int64)


def mirror_video(x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, F, H, W) with every frame of the videos where flip (B,) is True mirrored left-right."""
    if flip is None:
        return x
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1, 1), x.flip(-1), x)


def to_pixels(videos: np.ndarray) -> torch.Tensor:
    """uint8 (B, F, H, W, C) -> float32 (B, C, F, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


@torch.no_grad()
def encode_video(vae, pixels: torch.Tensor, chunk: int = ENCODE_CHUNK) -> torch.Tensor:
    """Pixels (B, C, F, H, W) in [-1, 1] (C 1 or 3; grey is repeated to RGB) -> latents (B, 4, F, h, w), each
    frame encoded by encode_latents (posterior mean * LATENT_SCALE), `chunk` frames per call."""
    b, c, f, h, w = pixels.shape
    frames = pixels.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).expand(-1, 3, -1, -1)  # (B * F, 3, H, W)
    latents = torch.cat([encode_latents(vae, frames[k:k + chunk]) for k in range(0, b * f, chunk)])
    return latents.view(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()  # (B, C', F, h, w)


class VideoData(TrainData):
    """What the video sources share: the optional per-frame VAE and batch() from pixels()."""
    vae = None
    frame_size: tuple[int, int]  # (H, W) of the pixel frames

    def _use_vae(self, vae: str | None, device, channels: int, frames: int, height: int, width: int) -> None:
        self.frame_size = (height, width)
        self.sample_shape = (channels, frames, height, width)
        if vae is None:
            return
        self.vae, self.vae_path = load_vae(vae, device), vae
        self.device = self.vae.device
        (c, h, _), (_, _, w) = vae_latent_shape(self.vae, height), vae_latent_shape(self.vae, width)
        self.sample_shape = (c, frames, h, w)

    @abstractmethod
    def pixels(self, indices: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, F, H, W) float32 in [-1, 1], mirrored where flip is True."""

    def batch(self, indices, flip=None):
        x = self.pixels(indices, flip)  # (B, C, F, H, W)
        if self.vae is not None:
            x = encode_video(self.vae, x)
        return x, self.labels[indices].to(x.device)


# --- npz files ------------------------------------------------------------------------------------------
def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an npz file by name: members stored uncompressed (np.savez) memory-mapped read-only,
    compressed ones (np.savez_compressed) read into memory. Never unpickles."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".npy")]
        arrays, packed = {}, []
        with open(path, "rb") as f:
            for member in members:
                name = member.filename[:-4]
                if member.compress_type != zipfile.ZIP_STORED:
                    packed.append(name)
                    continue
                f.seek(member.header_offset)
                fields = ZIP_LOCAL_HEADER.unpack(f.read(ZIP_LOCAL_HEADER.size))
                f.seek(member.header_offset + ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1])
                shape, fortran, dtype = _npy_header(f)
                order = "F" if fortran else "C"
                arrays[name] = np.memmap(path, dtype, "r", f.tell(), shape, order) if math.prod(shape) else \
                    np.zeros(shape, dtype)  # mmap refuses empty ranges
        if packed:
            with np.load(path, allow_pickle=False) as npz:
                arrays.update({name: npz[name] for name in packed})
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error) as e:
        raise FlexDiTError(f"cannot read {path} as an npz file: {e}; write it with numpy.savez") from None
    return arrays


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("it holds Python objects, which flexdit does not unpickle")
    return shape, fortran, dtype


def _pick(arrays: dict[str, np.ndarray], keys: tuple[str, str], path: Path, what: str) -> np.ndarray:
    found = next((arrays[k] for k in keys if k in arrays), None)
    if found is None:
        raise FlexDiTError(f"{path} has no {what} (an array named {keys[0]!r} or {keys[1]!r}; it holds "
                           f"{sorted(arrays) or 'none'}); save them with write_video_npz")
    return found


class VideoNpzData(VideoData):
    """An npz with uint8 videos (N, F, H, W) or (N, F, H, W, C) (C 1 or 3) under "videos" (or arr_0), int labels
    (N,) under "labels" (or arr_1), and optionally the class names under "class_names". Samples are pixels
    (C, F, H, W) in [-1, 1], or per-frame VAE latents. Uncompressed files are memory-mapped: a batch reads only
    its own videos. `frames` takes that many evenly spaced frames of each video; `image_size` must match."""

    def __init__(self, path: str | Path, frames: int | None = None, image_size: int | None = None,
                 vae: str | None = None, device="cpu"):
        path = Path(path)
        arrays = npz_arrays(path)
        videos = _pick(arrays, VIDEO_KEYS, path, "videos")
        labels = _pick(arrays, LABEL_KEYS, path, "labels")
        self._check(path, videos, labels)
        self.videos = videos if videos.ndim == 5 else videos[..., None]  # (N, F, H, W, C)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        if NAMES_KEY in arrays:
            self.class_names = [str(s) for s in arrays[NAMES_KEY].reshape(-1)]
        self.num_classes = len(self.class_names) if self.class_names else int(labels.max()) + 1
        if labels.min() < 0 or labels.max() >= self.num_classes:
            bad, names = int(labels.min() if labels.min() < 0 else labels.max()), len(self.class_names or ())
            raise FlexDiTError(f"{path} has label {bad} outside 0..{self.num_classes - 1}"
                               f"{f' (its {names} class names)' if names else ''}; labels count classes from 0")
        _, total, h, w, c = self.videos.shape
        frames = total if frames is None else frames
        if frames < 1:
            raise FlexDiTError(f"frames must be at least 1, got {frames}")
        if frames > total:
            raise FlexDiTError(f"{path} has videos of {total} frames, too few for frames {frames}; ask for at most "
                               f"{total}")
        if image_size is not None and (h, w) != (image_size, image_size):
            raise FlexDiTError(f"{path} holds {h}x{w} frames, not {image_size}x{image_size}; use image size {h} "
                               "or leave it out (npz videos are not resized)")
        self.frame_indices = even_frames(total, frames)
        self._use_vae(vae, device, c, frames, h, w)

    @staticmethod
    def _check(path: Path, videos: np.ndarray, labels: np.ndarray) -> None:
        if videos.dtype != np.uint8:
            raise FlexDiTError(f"{path} holds {videos.dtype} videos; store them as uint8 pixels 0..255")
        if videos.ndim not in (4, 5) or (videos.ndim == 5 and videos.shape[-1] not in (1, 3)) or not len(videos):
            raise FlexDiTError(f"{path} holds videos of shape {videos.shape}; store (N, F, H, W) or (N, F, H, W, C) "
                               "with N >= 1 and C 1 or 3")
        if labels.dtype.kind not in "iu" or labels.shape != (len(videos),):
            raise FlexDiTError(f"{path} holds {labels.dtype} labels of shape {labels.shape} for {len(videos)} "
                               f"videos; store one integer label per video")

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, indices, flip=None):
        videos = self.videos[np.ix_(indices.numpy(), self.frame_indices)]  # (B, F, H, W, C) uint8: reads only these
        return mirror_video(to_pixels(videos), flip)


# --- frame folders --------------------------------------------------------------------------------------
def natural_key(path: Path) -> list:
    """Name order with numbers compared as numbers: frame2 before frame10."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def scan_video_folder(folder: Path) -> tuple[list[str], list[Path], list[list[Path]], list[int]]:
    """(class names, video folders, each video's frame files in order, class ids): classes are the sorted
    subfolders, videos their sorted subfolders, frames the images in a video folder."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FlexDiTError(f"{folder} has no class subfolders; put each video's frames in a folder, inside one "
                           "subfolder per class (a single one for unconditional data)")
    videos, frames, labels = [], [], []
    for label, name in enumerate(classes):
        found = sorted((d for d in (folder / name).iterdir() if d.is_dir() and not d.name.startswith(".")),
                       key=natural_key)
        if not found:
            raise FlexDiTError(f"class folder {folder / name} holds no video folders; put each video's frames in "
                               "a subfolder of its class")
        videos += found
        for video in found:
            frames.append(sorted((p for p in video.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                                 key=natural_key))
            labels.append(label)
    return classes, videos, frames, labels


def load_frames(paths: list[Path], size: int) -> np.ndarray:
    """A video's frame files -> (F, size, size, 3) uint8, each cropped as ImageFolderData crops; the frames must
    share one size, or the crops would not line up."""
    from PIL import Image

    sizes = []
    for p in paths:
        try:
            with Image.open(p) as image:
                sizes.append(image.size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise FlexDiTError(f"cannot read frame {p}: {e}; remove or replace the file") from None
    odd = next((k for k, s in enumerate(sizes) if s != sizes[0]), None)
    if odd is not None:
        raise FlexDiTError(f"video {paths[0].parent} mixes frame sizes: {paths[0].name} is {sizes[0][0]}x"
                           f"{sizes[0][1]} but {paths[odd].name} {sizes[odd][0]}x{sizes[odd][1]}; resize its frames "
                           "to one size")
    return np.stack([load_image(p, size) for p in paths])


class VideoFolderData(VideoData):
    """One subfolder per class (ids = sorted names), one subfolder per video holding its frames as images (in
    name order, numbers as numbers). Each video gives `frames` evenly spaced frames (all of them when it has
    exactly that many; fewer is an error), RGB, centre-cropped to image_size as ImageFolderData crops; with a
    VAE they are encoded frame by frame on `device`. Frames are read when a batch asks for them."""

    def __init__(self, folder: str | Path, frames: int | None, image_size: int | None, vae: str | None = None,
                 device="cpu"):
        folder = Path(folder)
        if frames is not None and frames < 1:
            raise FlexDiTError(f"frames must be at least 1, got {frames}")
        if image_size is None or image_size < 1:
            raise FlexDiTError(f"{folder} is a folder of frame images: give a positive image size (the side frames "
                               f"are cropped to), got {image_size}")
        self.classes, self.videos, self.paths, labels = scan_video_folder(folder)
        counts = [len(p) for p in self.paths]
        if frames is None:
            if len(set(counts)) > 1:
                raise FlexDiTError(f"the videos in {folder} have {min(counts)} to {max(counts)} frames; give the "
                                   "number of frames to take from each")
            frames = counts[0]
        short = next((k for k, n in enumerate(counts) if n < max(frames, 1)), None)
        if short is not None:
            raise FlexDiTError(f"video {self.videos[short]} has {counts[short]} frame images "
                               f"({'/'.join(IMAGE_EXTENSIONS)}), fewer than the {max(frames, 1)} asked for; add "
                               "frames, remove the video or ask for fewer")
        self.paths = [[p[i] for i in even_frames(len(p), frames)] for p in self.paths]
        self.image_size = image_size
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes, self.class_names = len(self.classes), self.classes
        self._use_vae(vae, device, 3, frames, image_size, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, indices, flip=None):
        videos = [self.paths[i] for i in indices.tolist()]
        with ThreadPoolExecutor() as pool:
            arrays = np.stack(list(pool.map(lambda p: load_frames(p, self.image_size), videos)))  # (B, F, H, W, 3)
        return mirror_video(to_pixels(arrays), flip)


# --- detection ------------------------------------------------------------------------------------------
def open_video_dataset(path: str | Path, frames: int | None = None, image_size: int | None = None,
                       vae: str | None = None, device="cpu") -> VideoData:
    """The video source at `path`, recognised by content: a zip (npz) file -> VideoNpzData; a folder of class
    folders of video folders of frames -> VideoFolderData (image_size required)."""
    path = Path(path)
    if frames is not None and frames < 1:
        raise FlexDiTError(f"frames must be at least 1, got {frames}")
    if not path.exists():
        raise FlexDiTError(f"video data not found: {path}; give an npz of videos or a folder of frame folders")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != ZIP_MAGIC:
                raise FlexDiTError(f"{path} is not an npz file; give an npz of uint8 videos (write_video_npz) or a "
                                   "folder of frame folders")
        return VideoNpzData(path, frames, image_size, vae, device)
    if not path.is_dir():
        raise FlexDiTError(f"{path} is neither a file nor a folder; give an npz of videos or a folder of frames")
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    if not entries:
        raise FlexDiTError(f"video folder {path} is empty; put each video's frames in a folder, inside one "
                           "subfolder per class")
    if any(idx_paths(path, s) for s in IDX_FILES):
        raise FlexDiTError(f"{path} holds Fashion-MNIST images, not videos; make videos with "
                           "write_fashion_mnist_videos and give that npz")
    return VideoFolderData(path, frames, image_size, vae, device)


# --- extracted latents ----------------------------------------------------------------------------------
def extract_video_latents(videos: str | Path, vae: str, out: str | Path, frames: int | None = None,
                          image_size: int | None = None, batch: int = 8, flip: bool = False, shard_size: int = 1000,
                          device: str = "auto", progress: bool = True) -> dict:
    """Encode every video of `videos` (as open_video_dataset takes it; square frames) frame by frame to
    posterior-mean latents * LATENT_SCALE (C, F, h, w), with the mirrored videos' latents when `flip`, as float16
    shards of `shard_size` videos plus meta.json ("frames" added) in `out`, the layout of flexdit extract-latents:
    open_dataset(out) reads it back as LatentsData. meta.json is written last. Returns its contents."""
    if batch < 1 or shard_size < 1:
        raise FlexDiTError(f"batch and shard size must be at least 1, got {batch} and {shard_size}")
    folder = Path(out)
    _check_latents_output(folder, videos)
    data = open_video_dataset(videos, frames, image_size)
    height, width = data.frame_size
    if height != width:
        raise FlexDiTError(f"{videos} has {height}x{width} frames; latents are extracted from square frames, crop "
                           "them to a square")
    autoencoder = load_vae(vae, resolve_device(device))
    c, h, w = vae_latent_shape(autoencoder, height)
    latent_shape = (c, data.sample_shape[1], h, w)  # (C, F, h, w)
    (folder / META_FILE).unlink(missing_ok=True)  # incomplete until the last shard is written
    remove_stale_temporaries(folder)

    n = len(data)
    shard_ranges = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    with tqdm(total=n, desc="extract-video-latents", unit="video", disable=not progress) as bar:
        for shard, (start, end) in enumerate(shard_ranges):
            parts = {"latents": [], "labels": [], "latents_flip": []}
            for b in range(start, end, batch):
                indices = torch.arange(b, min(b + batch, end))
                pixels, labels = data.batch(indices)  # (B, C, F, H, W), (B,)
                parts["latents"].append(encode_video(autoencoder, pixels).half().cpu())
                parts["labels"].append(labels.cpu())
                if flip:
                    parts["latents_flip"].append(encode_video(autoencoder, pixels.flip(-1)).half().cpu())
                bar.update(len(indices))
            tensors = {k: torch.cat(v) for k, v in parts.items() if v}
            atomic_write(folder / SHARD_NAME.format(shard), lambda tmp: save_file(tensors, str(tmp)))
    for stale in shard_files(folder)[len(shard_ranges):]:  # left by an earlier, larger extraction
        stale.unlink()

    meta = {"format": LATENTS_FORMAT, "image_size": height, "frames": latent_shape[1],
            "latent_shape": list(latent_shape), "num_classes": data.num_classes, "classes": data.class_names,
            "scale": LATENT_SCALE, "vae": str(Path(vae).resolve()), "flip": flip, "num_samples": n}
    atomic_write(folder / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return meta


def _check_latents_output(folder: Path, videos: str | Path) -> None:
    """A new folder, or one that only ever held our latents (reused); checked before any work."""
    check_output_folder(folder, source=("the videos", str(videos)))
    if not folder.exists():
        return
    ours = all(SHARD_RE.fullmatch(p.name) or p.name.startswith(TEMP_PREFIX) or p.name == META_FILE
               for p in folder.iterdir())
    if ours and (folder / META_FILE).exists():
        try:
            read_meta(folder)
        except FlexDiTError:
            ours = False
    if not ours:
        raise FlexDiTError(f"{folder} is not empty and not a flexdit-latents folder; give a new or empty folder "
                           "(a previous extraction there may be overwritten)")

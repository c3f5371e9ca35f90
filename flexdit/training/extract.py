"""`flexdit extract-latents`: encode an image folder once, so training reads latents instead of running the VAE.
`flexdit extract-captions`: encode a data source's captions once, so a PixArt trains without its T5 encoder.

The latents folder is complete exactly when it has meta.json: shards are written under a temporary name and
renamed into place, and meta.json comes last (an interrupted run leaves no meta.json and may be rerun).
"""
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from flexdit.distributed import resolve_device
from flexdit.errors import FlexDiTError
from flexdit.io import TEMP_PREFIX, atomic_write, check_output, check_output_folder, remove_stale_temporaries
from flexdit.text import CaptionTable, TextEncoder, class_captions, extract_captions, read_captions_file
from flexdit.training.data import (LATENTS_FORMAT, META_FILE, SHARD_NAME, ImageFolderData, encode_latents,
                                   open_dataset, read_meta, shard_files, vae_latent_shape)
from flexdit.vae import LATENT_SCALE, load_vae

SHARD_RE = re.compile(r"latents-\d{5}\.safetensors")


def extract_latents(images: str, vae: str, out: str, image_size: int, batch: int = 32, flip: bool = False,
                    shard_size: int = 10000, device: str = "auto", progress: bool = True) -> dict:
    """Encode every image of `images` (one subfolder per class) to posterior-mean latents * LATENT_SCALE,
    with the mirrored images' latents when `flip`; write float16 shards of `shard_size` and meta.json to `out`.
    Returns the meta.json contents."""
    if batch < 1 or shard_size < 1:
        raise FlexDiTError(f"--batch and --shard-size must be at least 1, got {batch} and {shard_size}")
    folder = Path(out)
    _check_output(folder, images)
    data = open_dataset(images, image_size)
    if not isinstance(data, ImageFolderData):
        raise FlexDiTError(f"--images {images} is not an image folder; give a folder with one subfolder of "
                           "images per class")
    autoencoder = load_vae(vae, resolve_device(device))
    latent_shape = vae_latent_shape(autoencoder, image_size)
    (folder / META_FILE).unlink(missing_ok=True)  # incomplete until the last shard is written
    remove_stale_temporaries(folder)

    n = len(data)
    shard_ranges = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    with tqdm(total=n, desc="extract-latents", unit="img", disable=not progress) as bar, \
            ThreadPoolExecutor(1) as prefetch:
        for shard, (start, end) in enumerate(shard_ranges):
            batches = [torch.arange(b, min(b + batch, end)) for b in range(start, end, batch)]
            parts = {"latents": [], "labels": [], "latents_flip": []}
            pending = prefetch.submit(data.batch, batches[0])  # decode the next batch while this one encodes
            for k in range(len(batches)):
                pixels, labels = pending.result()  # (B, 3, size, size), (B,)
                if k + 1 < len(batches):
                    pending = prefetch.submit(data.batch, batches[k + 1])
                parts["latents"].append(encode_latents(autoencoder, pixels).half().cpu())
                parts["labels"].append(labels)
                if flip:
                    parts["latents_flip"].append(encode_latents(autoencoder, pixels.flip(-1)).half().cpu())
                bar.update(len(labels))
            _write_shard(folder / SHARD_NAME.format(shard), {k: torch.cat(v) for k, v in parts.items() if v})
    for stale in shard_files(folder)[len(shard_ranges):]:  # left by an earlier, larger extraction
        stale.unlink()

    meta = {"format": LATENTS_FORMAT, "image_size": image_size, "latent_shape": list(latent_shape),
            "num_classes": data.num_classes, "classes": data.classes, "scale": LATENT_SCALE,
            "vae": str(Path(vae).resolve()), "flip": flip, "num_samples": n}
    atomic_write(folder / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return meta


def extract_data_captions(data: str, text_encoder: str, out: str, template: str = "a photo of a {}",
                          captions_file: str | None = None, batch: int = 64, device: str = "auto",
                          progress: bool = True) -> CaptionTable:
    """The caption table of the data at `data` (as --data takes it), written to `out`: the lines of
    `captions_file` (one per class in label order, or one per sample in sample order), else `template` filled
    with each class's name (Fashion-MNIST's, an image folder's subfolders, or those a latents folder recorded).
    The table also holds the encoded empty prompt, the null caption of models that have no learned one."""
    check_output(out, source=data)
    dataset = open_dataset(data, labels_only=True)
    if captions_file is not None:
        captions = read_captions_file(captions_file)
        per = {dataset.num_classes: "class", len(dataset): "sample"}.get(len(captions))
        if per is None:
            raise FlexDiTError(f"{captions_file} holds {len(captions)} captions but the data has "
                               f"{dataset.num_classes} classes and {len(dataset)} samples; write one per class or "
                               "one per sample")
    elif dataset.class_names is None:
        raise FlexDiTError(f"{data} does not name its classes; give --captions-file (one caption per class or "
                           "per sample)")
    else:
        captions, per = class_captions(dataset.class_names, template), "class"
    encoder = TextEncoder.load(text_encoder, resolve_device(device))
    table = extract_captions(encoder, captions, per, batch, progress=progress)
    table.save(out)
    return table


def _check_output(folder: Path, images: str) -> None:
    """A new folder, or one that only ever held our latents (reused), checked before any work; nothing changes yet."""
    check_output_folder(folder, source=("--images", images))
    if not folder.exists():
        return
    ours = all(SHARD_RE.fullmatch(p.name) or p.name.startswith(TEMP_PREFIX) or p.name == META_FILE
               for p in folder.iterdir())
    if not ours or ((folder / META_FILE).exists() and not _is_latents_meta(folder)):
        raise FlexDiTError(f"--out {folder} is not empty and not a flexdit-latents folder; give a new or empty "
                           "folder (a previous extraction there may be overwritten)")


def _is_latents_meta(folder: Path) -> bool:
    try:
        read_meta(folder)
    except FlexDiTError:
        return False
    return True


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))

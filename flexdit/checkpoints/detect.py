"""The one place that tells a checkpoint's format: a folder is a diffusers model, a file is read by its content
(flexdit.checkpoints.files), and the format is the first whose keys or metadata match, in the order below."""
from pathlib import Path
from types import ModuleType

from flexdit.checkpoints import diffusers, diffusers_latte, diffusers_pixart, dit, latte, ours, pixart, sparsedit
from flexdit.checkpoints.files import Source, check_finite, read_file
from flexdit.errors import FlexDiTError

# ours first: its files also hold the original key names; PixArt and Latte before DiT: their files also hold
# blocks.* and x_embedder (diffusers' Latte folders, which share PixArt's keys, before PixArt's, and both before DiT's)
FORMATS = (ours, diffusers_latte, diffusers_pixart, diffusers, pixart, latte, sparsedit, dit)


def read(path: str, weights: str | None = None) -> Source:
    """The checkpoint at `path` (file or folder) with finite weights; `weights` picks EMA or model weights."""
    p = Path(path)
    source = diffusers.read_folder(p, weights) if p.is_dir() else read_file(p, weights)
    check_finite(source)
    return source


def detect(source: Source) -> ModuleType:
    """The format module (one of FORMATS) whose layout `source` has."""
    fmt = next((fmt for fmt in FORMATS if fmt.matches(source)), None)
    if fmt is None:
        sample = ", ".join(sorted(source.state)[:4])
        raise FlexDiTError(f"unknown checkpoint key layout (keys start: {sample}); supported: original DiT, "
                           "PixArt-alpha and Latte, SparseDiT/FlexDiT authors' code, diffusers DiTTransformer2DModel, "
                           "PixArtTransformer2DModel and LatteTransformer3DModel, flexdit")
    return fmt

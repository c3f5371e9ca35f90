"""Checkpoints: read any supported file or folder into a ready model; save in our format (`DiT.save`).

Formats read, one module each, told apart by flexdit.checkpoints.detect (from the content, never the name):
  flexdit    ours.py: safetensors written by `model.save` (our JSON config in its metadata), and the trainer's
             torch.save checkpoints;
  dit        dit.py: facebookresearch/DiT state dicts (bare, or under "ema"/"model"; torch.save or safetensors);
  pixart     pixart.py: PixArt-alpha/PixArt-alpha .pth files ({"state_dict": ...}), 256/512 px and 1024-MS;
  sparsedit  sparsedit.py: the FlexDiT/SparseDiT authors' code (poolingformer_blocks, dumbbell_blocks, ...);
  diffusers  diffusers.py: DiTTransformer2DModel folders (or pipeline folders), or their bare state dicts;
  diffusers-pixart  diffusers_pixart.py: PixArtTransformer2DModel folders (or PixArtAlphaPipeline folders);
  latte      latte.py: Vchitect/Latte files ({"ema", "model"}), unconditional and class-conditional;
  diffusers-latte   diffusers_latte.py: LatteTransformer3DModel folders (or LattePipeline folders).
Nothing here unpickles code: safetensors, or torch.load(weights_only=True).
"""
import os
from dataclasses import dataclass, field

import torch

from flexdit.checkpoints import detect
from flexdit.checkpoints.dit import dit_state_dict
from flexdit.checkpoints.files import State
from flexdit.errors import FlexDiTError
from flexdit.models.core import FlexDiTCore
from flexdit.models.families import build_model
from flexdit.models.from_dense import ConversionReport, flexdit_from_dense
from flexdit.models.layout import Layout
from flexdit.schedule import T_MAX, Density, FixedGrid, parse_density

FORMATS = tuple(fmt.NAME for fmt in detect.FORMATS)
OVERRIDES = ("num_heads", "input_size", "num_classes", "layout", "density", "grid", "sparse_grid", "weights",
             "timestep_freq_shift", "frames")
__all__ = ["FORMATS", "OVERRIDES", "LoadedCheckpoint", "dit_state_dict", "load", "load_checkpoint", "retarget",
           "save_model"]


@dataclass
class LoadedCheckpoint:
    model: FlexDiTCore
    format: str
    path: str
    notes: list[str] = field(default_factory=list)
    conversion: ConversionReport | None = None  # set when a dense checkpoint was converted on load


def load(path: str | os.PathLike, **overrides) -> FlexDiTCore:
    """A ready model (eval mode, CPU, fp32) from any supported checkpoint; see `load_checkpoint`."""
    return load_checkpoint(path, **overrides).model


def load_checkpoint(path: str | os.PathLike, **overrides) -> LoadedCheckpoint:
    """Detect the format of `path` and build the model.

    Overrides: num_heads, input_size (latent H or (H, W)), num_classes, timestep_freq_shift (1 reproduces
    diffusers' DiT port), weights ("ema" or "model" for training checkpoints holding both),
    sparse_grid (SparseDiT files: the released code's fixed grid, default 8), density (R_MIN,R_MAX string,
    (r_min, r_max) or a schedule) or grid (side, (h, w) or "HxW"), and layout ("default", "dense" or a spec:
    a dense checkpoint is then converted to a FlexDiT as `flexdit convert` does).
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise FlexDiTError(f"unknown load option {unknown[0]!r}; accepted: {', '.join(OVERRIDES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    path = str(path)
    density = _density_override(overrides)
    layout = overrides.pop("layout", None)
    source = detect.read(path, overrides.pop("weights", None))
    fmt = detect.detect(source)
    if "sparse_grid" in overrides and fmt.NAME != "sparsedit":
        raise FlexDiTError("sparse_grid applies to SparseDiT checkpoints only; use density= or grid= instead")
    state, config, notes = fmt.build(source, overrides)
    model = build_model(config)
    _load_weights(model, state, path)
    return retarget(LoadedCheckpoint(model.eval(), fmt.NAME, path, notes), layout, density)


def retarget(loaded: LoadedCheckpoint, layout: Layout | str | None = None,
             density: Density | None = None) -> LoadedCheckpoint:
    """Give a loaded model another layout (a dense model becomes a FlexDiT) and/or another density."""
    model = loaded.model
    if layout is not None:
        target = model.parse_layout(layout)
        if target.kinds != model.layout.kinds:
            if not model.layout.is_dense:
                raise FlexDiTError(f"the checkpoint is a FlexDiT with layout {model.layout}; it cannot take layout "
                                   f"{target} (only a dense model converts to a new layout)")
            model, loaded.conversion = flexdit_from_dense(model, target, density)
            loaded.model = model.eval()
    if density is not None:
        if not model.layout.has_sparse_tokens:
            raise FlexDiTError("a density or grid was given for a dense model; add layout='default' "
                               "(--layout default) to convert it to a FlexDiT")
        model.with_density(density)
    if model.density is not None:
        model.density.grids(torch.tensor([0, T_MAX]), model.token_grid)  # a grid the tokens cannot fill fails now
    return loaded


def save_model(model: FlexDiTCore, path: str | os.PathLike) -> None:
    """Our format (safetensors + JSON config in its metadata), written atomically: `model.save(path)`."""
    model.save(path)


def _density_override(overrides: dict) -> Density | None:
    density, grid = overrides.pop("density", None), overrides.pop("grid", None)
    if density is not None and grid is not None:
        raise FlexDiTError("give either density or grid, not both")
    if isinstance(density, (tuple, list)):
        density = ",".join(map(str, density))
    if isinstance(grid, (tuple, list)):
        return FixedGrid(*grid) if len(grid) == 2 else FixedGrid(grid[0], grid[0])
    if isinstance(grid, int):
        return FixedGrid(grid, grid)
    if density is None or isinstance(density, str):
        return parse_density(density, grid)
    return density


def _load_weights(model: FlexDiTCore, state: State, path: str) -> None:
    """Strict load with one-line errors naming the first missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise FlexDiTError(f"{path} is missing {len(missing)} tensors the model needs (first: {missing[0]})")
    if unexpected:
        raise FlexDiTError(f"{path} has {len(unexpected)} tensors the model does not use (first: {unexpected[0]})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise FlexDiTError(f"shape mismatch for {k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}; "
                               "check num_heads / input_size / the model size")
    model.load_state_dict(state, strict=True)

"""Checkpoints: detect the format, build the model, load the weights; save in our format.

Formats read:
  flexdit    safetensors written by `model.save`, with our JSON config in the file's metadata;
  dit        facebookresearch/DiT state dicts (.pt: bare, or under "ema"/"model"; also .safetensors);
  sparsedit  the FlexDiT/SparseDiT authors' code (poolingformer_blocks, dumbbell_blocks, normal_blocks);
  diffusers  DiTTransformer2DModel: a folder with config.json (or a pipeline folder with transformer/),
             or its bare state dict (then input_size= is needed).
Nothing here unpickles code: safetensors, or torch.load(weights_only=True).
"""
import argparse
import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from flexdit.errors import FlexDiTError
from flexdit.io import atomic_write
from flexdit.models.dit import HEADS_BY_HIDDEN, DiT, DiTConfig
from flexdit.models.from_dense import ConversionReport, flexdit_from_dense
from flexdit.models.layout import Layout
from flexdit.nn.blocks import DENSE, GEN, POOL, RECOVER, SPARSE
from flexdit.nn.embed import sincos_pos_embed_2d
from flexdit.schedule import Density, FixedGrid, parse_density

FORMATS = ("flexdit", "dit", "sparsedit", "diffusers")
OVERRIDES = ("num_heads", "input_size", "num_classes", "layout", "density", "grid", "sparse_grid", "weights",
             "timestep_freq_shift")
METADATA_KEY = "flexdit_config"
State = dict[str, torch.Tensor]


@dataclass
class LoadedCheckpoint:
    model: DiT
    format: str
    path: str
    notes: list[str] = field(default_factory=list)
    conversion: ConversionReport | None = None  # set when a dense checkpoint was converted on load


# --- public API ---------------------------------------------------------------------------------------
def load(path: str | os.PathLike, **overrides) -> DiT:
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
    state, metadata, diffusers_config = _read(path, overrides.pop("weights", None))
    fmt = _detect(state, metadata, diffusers_config)
    if "sparse_grid" in overrides and fmt != "sparsedit":
        raise FlexDiTError("sparse_grid applies to SparseDiT checkpoints only; use density= or grid= instead")
    layout = overrides.pop("layout", None)

    if fmt == "flexdit":
        config, notes = _config_from_metadata(metadata, overrides), []
    elif fmt == "sparsedit":
        state, config, notes = _from_sparsedit(state, overrides)
    elif fmt == "diffusers":
        state, config, notes = _from_diffusers(state, diffusers_config, overrides)
    else:
        config, notes = _config_from_dit_state(state, overrides), []

    model = DiT(config)
    _load_weights(model, state, path)
    return retarget(LoadedCheckpoint(model.eval(), fmt, path, notes), layout, density)


def retarget(loaded: LoadedCheckpoint, layout: Layout | str | None = None,
             density: Density | None = None) -> LoadedCheckpoint:
    """Give a loaded model another layout (a dense model becomes a FlexDiT) and/or another density."""
    model = loaded.model
    if layout is not None:
        target = layout if isinstance(layout, Layout) else Layout.parse(str(layout), len(model.layout))
        if target.kinds != model.layout.kinds:
            if not model.layout.is_dense:
                raise FlexDiTError(f"the checkpoint is a FlexDiT with layout {model.layout}; it cannot take layout "
                                   f"{target} (only a dense DiT converts to a new layout)")
            model, loaded.conversion = flexdit_from_dense(model, target, density)
            loaded.model = model.eval()
    if density is not None:
        if not model.layout.has_sparse_tokens:
            raise FlexDiTError("a density or grid was given for a dense model; add layout='default' "
                               "(--layout default) to convert it to a FlexDiT")
        model.with_density(density)
    return loaded


def save_model(model: DiT, path: str | os.PathLike) -> None:
    """safetensors + JSON config in its metadata, written atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "flexdit", METADATA_KEY: json.dumps(model.config.to_dict())}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def dit_state_dict(model: DiT) -> State:
    """The state dict in facebookresearch/DiT's key layout (dense models only)."""
    if not model.layout.is_dense:
        raise FlexDiTError("only a dense model can be written in the original DiT key layout")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- reading files ------------------------------------------------------------------------------------
def _read(path: str, weights: str | None) -> tuple[State, dict | None, dict | None]:
    """(state dict, safetensors metadata, diffusers config) of a file or folder."""
    p = Path(path)
    if not p.exists():
        raise FlexDiTError(f"checkpoint not found: {path}")
    if p.is_dir():
        return _read_diffusers_folder(p)
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt") as f:
                metadata = f.metadata()
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise FlexDiTError(f"{path} is not a readable safetensors file ({e})") from None
        return _unwrap_prefixes(state), metadata, None
    obj = _torch_load(p)
    # flexdit training checkpoints carry their model config: read them like our safetensors files.
    metadata = {METADATA_KEY: obj["model_config"]} if isinstance(obj.get("model_config"), str) else None
    return _unwrap(obj, path, weights), metadata, None


def _torch_load(p: Path) -> dict:
    try:
        # argparse.Namespace is plain data; the authors' training checkpoints store their "args" in one.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe:
            raise FlexDiTError(f"{p} holds a pickled Python object ({unsafe.group(1)}), and flexdit never unpickles "
                               "code; re-save its state dict with torch.save or as safetensors") from None
        raise FlexDiTError(f"{p} is not a PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # torch raises many types for files that are not checkpoints at all
        raise FlexDiTError(f"{p} is not a PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise FlexDiTError(f"{p} holds a {type(obj).__name__}, not a state dict")
    return obj


def _unwrap(obj: dict, path: str, weights: str | None) -> State:
    """A training checkpoint {"model", "ema", "opt", ...} or {"state_dict": ...} -> one state dict."""
    wrapped = [k for k in ("ema", "model", "state_dict") if isinstance(obj.get(k), dict)]
    if weights is not None:
        if weights not in ("ema", "model"):
            raise FlexDiTError(f"weights must be 'ema' or 'model', got {weights!r}")
        if weights not in wrapped:
            raise FlexDiTError(f"{path} has no {weights!r} weights (it has: {', '.join(wrapped) or 'a bare state dict'})")
        obj = obj[weights]
    elif wrapped:
        obj = obj[wrapped[0]]  # EMA weights are the ones to sample and evaluate with
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FlexDiTError(f"{path} holds no tensors under {', '.join(map(repr, obj)) or 'its top level'}")
    return _unwrap_prefixes(tensors)


def _unwrap_prefixes(state: State) -> State:
    """Drop the prefixes added by DistributedDataParallel ('module.') and torch.compile ('_orig_mod.')."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_diffusers_folder(p: Path) -> tuple[State, None, dict]:
    if (p / "transformer" / "config.json").exists():
        p = p / "transformer"  # a pipeline folder
    config_file = p / "config.json"
    if not config_file.exists():
        raise FlexDiTError(f"folder {p} is not a diffusers model folder (no config.json); "
                           "give a checkpoint file or a DiTTransformer2DModel folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FlexDiTError(f"cannot read {config_file}: {e}") from None
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (p / name).exists():
            try:
                return load_file(str(p / name)), None, config
            except (SafetensorError, OSError) as e:
                raise FlexDiTError(f"{p / name} is not a readable safetensors file ({_first_line(e)})") from None
    if (p / "diffusion_pytorch_model.bin").exists():
        return _unwrap(_torch_load(p / "diffusion_pytorch_model.bin"), str(p), None), None, config
    raise FlexDiTError(f"folder {p} has a config.json but no diffusion_pytorch_model.safetensors or .bin")


def _detect(state: State, metadata: dict | None, diffusers_config: dict | None) -> str:
    if metadata and METADATA_KEY in metadata:
        return "flexdit"
    if diffusers_config is not None or "transformer_blocks.0.norm1.linear.weight" in state:
        return "diffusers"
    if any(k.startswith(("poolingformer_blocks.", "dumbbell_blocks.")) for k in state):
        return "sparsedit"
    if "x_embedder.proj.weight" in state and any(k.startswith("blocks.") for k in state):
        if any(re.match(r"blocks\.\d+\.attn\.(v|q|kv)\.", k) for k in state):
            raise FlexDiTError("this state dict has FlexDiT blocks but no flexdit config; load the .safetensors "
                               "file written by model.save / flexdit convert")
        return "dit"
    sample = ", ".join(sorted(state)[:4])
    raise FlexDiTError(f"unknown checkpoint key layout (keys start: {sample}); supported: original DiT, "
                       "SparseDiT/FlexDiT authors' code, diffusers DiTTransformer2DModel, flexdit")


# --- building configs -----------------------------------------------------------------------------------
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


def _shape(state: State, key: str) -> tuple[int, ...]:
    if key not in state:
        raise FlexDiTError(f"checkpoint is missing {key!r}; it is not a complete DiT-family model")
    return tuple(state[key].shape)


def _heads(hidden: int, overrides: dict) -> int:
    heads = overrides.get("num_heads") or HEADS_BY_HIDDEN.get(hidden)
    if heads is None:
        raise FlexDiTError(f"hidden size {hidden} is not a standard DiT size, so the number of heads is unknown; "
                           "pass num_heads= (--num-heads)")
    if hidden % heads:
        raise FlexDiTError(f"num_heads={heads} does not divide the hidden size {hidden}; pass a divisor")
    return heads


def _num_classes(rows: int, overrides: dict) -> tuple[int, float]:
    """(num_classes, class_dropout_prob) from the embedding table: the last row is the null class."""
    n = overrides.get("num_classes")
    if n is None:
        return rows - 1, 0.1
    if rows == n + 1:
        return n, 0.1
    if rows == n:
        return n, 0.0
    raise FlexDiTError(f"num_classes={n} contradicts the checkpoint's label table of {rows} rows "
                       f"(expected {n} or {n + 1} with the null class)")


def _input_size(tokens: int, patch: int, overrides: dict) -> tuple[int, int]:
    size = overrides.get("input_size")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if h % patch or w % patch or (h // patch) * (w // patch) != tokens:
            raise FlexDiTError(f"input_size {h}x{w} contradicts the checkpoint's {tokens} position embeddings "
                               f"at patch size {patch}")
        return h, w
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise FlexDiTError(f"{tokens} position embeddings do not form a square grid; pass input_size=(H, W)")
    return side * patch, side * patch


def _common_config(state: State, prefix_final: str, overrides: dict, tokens: int) -> dict:
    """Shape-inferred config of a DiT-family state dict in DiT key names."""
    hidden, in_channels, patch, _ = _shape(state, "x_embedder.proj.weight")
    out_features = _shape(state, prefix_final)[0]
    out_channels = out_features // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels) or out_channels * patch * patch != out_features:
        raise FlexDiTError(f"final layer of {out_features} outputs fits neither {in_channels} nor "
                           f"{2 * in_channels} channels at patch size {patch}; the checkpoint is inconsistent")
    num_classes, dropout = _num_classes(_shape(state, "y_embedder.embedding_table.weight")[0], overrides)
    fc1 = next((v for k, v in state.items() if k.endswith("mlp.fc1.weight")), None)
    return dict(
        input_size=_input_size(tokens, patch, overrides), patch_size=patch, in_channels=in_channels,
        hidden_size=hidden, num_heads=_heads(hidden, overrides),
        mlp_ratio=fc1.shape[0] / hidden if fc1 is not None else 4.0,
        num_classes=num_classes, class_dropout_prob=dropout, learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=int(overrides.get("timestep_freq_shift", 0)),
    )


def _block_indices(state: State, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def _config_from_dit_state(state: State, overrides: dict) -> DiTConfig:
    depth = len(_block_indices(state, r"blocks\.(\d+)\."))
    config = _common_config(state, "final_layer.linear.weight", overrides, _shape(state, "pos_embed")[1])
    return DiTConfig(**config, layout=Layout.dense(depth).kinds)


def _config_from_metadata(metadata: dict, overrides: dict) -> DiTConfig:
    try:
        saved = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise FlexDiTError(f"the flexdit config in this file is not valid JSON ({e})") from None
    for key in ("num_heads", "num_classes", "timestep_freq_shift"):
        if key in overrides and overrides[key] != saved.get(key):
            raise FlexDiTError(f"{key}={overrides[key]} contradicts the checkpoint's {key}={saved.get(key)}")
    if "input_size" in overrides:
        size = overrides["input_size"]
        size = [size, size] if isinstance(size, int) else list(size)
        if size != saved.get("input_size"):
            raise FlexDiTError(f"input_size={size} contradicts the checkpoint's input_size={saved.get('input_size')}")
    return DiTConfig.from_dict(saved)


def _from_sparsedit(state: State, overrides: dict) -> tuple[State, DiTConfig, list[str]]:
    """Authors' module tree -> our flat `blocks.{i}` with kinds, in their execution order."""
    if any(k.startswith("relative_pos_embedder.") for k in state):
        raise FlexDiTError("this SparseDiT checkpoint uses the relative position bias option (attn_relat_pos), "
                           "which flexdit does not support")
    order: list[tuple[str, str]] = [(f"poolingformer_blocks.{i}.", POOL)
                                    for i in _block_indices(state, r"poolingformer_blocks\.(\d+)\.")]
    groups = (("token_merge_blocks", GEN), ("semantic_blocks", SPARSE), ("token_recover_blocks", RECOVER),
              ("normal_blocks", DENSE))
    for d in _block_indices(state, r"dumbbell_blocks\.(\d+)\."):
        for group, kind in groups:
            prefix = f"dumbbell_blocks.{d}.{group}."
            order += [(f"{prefix}{j}.", kind) for j in _block_indices(state, re.escape(prefix) + r"(\d+)\.")]
    order += [(f"normal_blocks.{i}.", DENSE) for i in _block_indices(state, r"normal_blocks\.(\d+)\.")]

    renamed = {k: v for k, v in state.items() if not k.startswith(("poolingformer_blocks.", "dumbbell_blocks.",
                                                                    "normal_blocks."))}
    for n, (prefix, kind) in enumerate(order):
        for k, v in state.items():
            if k.startswith(prefix):
                rest = k[len(prefix):].replace("merged_layer1.", "merge.sparse.").replace("merged_layer2.",
                                                                                          "merge.dense.")
                renamed[f"blocks.{n}.{rest}"] = v
    try:
        layout = Layout(tuple(kind for _, kind in order))
    except FlexDiTError as e:
        raise FlexDiTError(f"the SparseDiT blocks do not form a valid FlexDiT: {e}") from None
    side = overrides.get("sparse_grid", 8)
    grid = FixedGrid(*side) if isinstance(side, (tuple, list)) else FixedGrid(side, side)
    config = _common_config(renamed, "final_layer.linear.weight", overrides, _shape(renamed, "pos_embed")[1])
    notes = [f"SparseDiT layout {layout}; sparse grid {grid.height}x{grid.width} (the released code's fixed grid)"]
    return renamed, DiTConfig(**config, layout=layout.kinds, density=grid.to_dict()), notes


_DIFFUSERS_BLOCK = {
    "norm1.linear.": "adaLN_modulation.1.",
    "attn1.to_out.0.": "attn.proj.",
    "ff.net.0.proj.": "mlp.fc1.",
    "ff.net.2.": "mlp.fc2.",
}
_DIFFUSERS_TOP = {
    "pos_embed.proj.": "x_embedder.proj.",
    "proj_out_1.": "final_layer.adaLN_modulation.1.",
    "proj_out_2.": "final_layer.linear.",
}
_DIFFUSERS_EMBED = {
    "timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "class_embedder.embedding_table.": "y_embedder.embedding_table.",
}


def _from_diffusers(state: State, config: dict | None, overrides: dict) -> tuple[State, DiTConfig, list[str]]:
    """DiTTransformer2DModel -> DiT keys: q, k, v concatenated into qkv; the per-block copies of the
    timestep/label embedders must be identical (converted DiT weights always are) and become one."""
    config = config or {}
    notes = []
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise FlexDiTError(f"diffusers norm_type {config['norm_type']!r} is not a DiT; only ada_norm_zero is")
    out, renamed = {}, set()
    depth = len(_block_indices(state, r"transformer_blocks\.(\d+)\."))
    for i in range(depth):
        src = f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [state.get(f"{src}attn1.to_{n}.{part}") for n in "qkv"]
            if any(t is None for t in qkv):
                raise FlexDiTError(f"diffusers block {i} has no attn1.to_q/to_k/to_v {part}; not a DiT transformer")
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(qkv, dim=0)
            renamed.update(f"{src}attn1.to_{n}.{part}" for n in "qkv")
        for theirs, ours in _DIFFUSERS_BLOCK.items():
            for k in [k for k in state if k.startswith(src + theirs)]:
                out[f"blocks.{i}.{ours}{k[len(src + theirs):]}"] = state[k]
                renamed.add(k)
        for theirs, ours in _DIFFUSERS_EMBED.items():
            for k in [k for k in state if k.startswith(f"{src}norm1.emb.{theirs}")]:
                key = ours + k[len(f"{src}norm1.emb.{theirs}"):]
                if key in out and not torch.equal(out[key], state[k]):
                    raise FlexDiTError(f"diffusers block {i} has its own {theirs.rstrip('.')} weights that differ "
                                       "from block 0's; a DiT shares one embedder, so this model cannot be loaded")
                out[key] = state[k]
                renamed.add(k)
    for theirs, ours in _DIFFUSERS_TOP.items():
        for k in [k for k in state if k.startswith(theirs)]:
            out[ours + k[len(theirs):]] = state[k]
            renamed.add(k)
    leftover = sorted(set(state) - renamed - {"pos_embed.pos_embed"})
    if leftover:
        raise FlexDiTError(f"diffusers keys flexdit cannot map (e.g. {leftover[0]}); "
                           "only DiTTransformer2DModel without cross-attention is supported")

    patch = _shape(out, "x_embedder.proj.weight")[2]
    if "input_size" not in overrides and "sample_size" in config:
        overrides = {**overrides, "input_size": config["sample_size"]}
    if "input_size" not in overrides:
        raise FlexDiTError("a bare diffusers state dict does not record the latent size; pass input_size= "
                           "(e.g. 32 for 256 px images)")
    size = overrides["input_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if "num_heads" not in overrides and "num_attention_heads" in config:
        overrides = {**overrides, "num_heads": config["num_attention_heads"]}
    common = _common_config(out, "final_layer.linear.weight", overrides, (h // patch) * (w // patch))
    eps = config.get("norm_eps", 1e-5)
    if eps != 1e-6:
        notes.append(f"diffusers config norm_eps={eps} for the MLP norm; flexdit uses DiT's 1e-6")
    if common["timestep_freq_shift"] == 0:
        notes.append("timestep frequencies as the original DiT (diffusers' port uses timestep_freq_shift=1)")
    dit_config = DiTConfig(**common, layout=Layout.dense(depth).kinds)
    out["pos_embed"] = sincos_pos_embed_2d(dit_config.hidden_size, *dit_config.token_grid)[None]
    return out, dit_config, notes


# --- loading weights ------------------------------------------------------------------------------------
def _load_weights(model: DiT, state: State, path: str) -> None:
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

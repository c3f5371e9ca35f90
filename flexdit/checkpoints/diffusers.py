"""diffusers DiTTransformer2DModel: a model folder (config.json + weights), a pipeline folder with transformer/,
or a bare state dict (then input_size= is needed)."""
import json
from pathlib import Path

import torch

from flexdit.checkpoints.files import Source, State, first_sentence, read_file
from flexdit.checkpoints.infer import block_indices, common_config, shape
from flexdit.errors import FlexDiTError
from flexdit.io import check_input_file
from flexdit.models.dit import DiTConfig
from flexdit.models.layout import Layout
from flexdit.nn.embed import sincos_pos_embed_2d

NAME = "diffusers"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")


def read_folder(p: Path, weights: str | None = None) -> Source:
    """The weights and config.json of a model folder, or of the transformer/ folder of a pipeline."""
    if (p / "transformer" / "config.json").exists():
        p = p / "transformer"  # a pipeline folder
    config_file = p / "config.json"
    if not config_file.exists():
        raise FlexDiTError(f"{p} is a directory without a config.json, so not a diffusers model folder; "
                           "give a checkpoint file or a diffusers transformer folder")
    check_input_file(config_file, "config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise FlexDiTError(f"cannot read {config_file} ({first_sentence(e)})") from None
    if not isinstance(config, dict):
        raise FlexDiTError(f"{config_file} holds a JSON {type(config).__name__}, not a model config")
    weights_file = next((p / name for name in WEIGHTS if (p / name).exists()), None)
    if weights_file is None:
        raise FlexDiTError(f"folder {p} has a config.json but no {' or '.join(WEIGHTS)}")
    source = read_file(weights_file, weights)
    source.config = config
    return source


def matches(source: Source) -> bool:
    return source.config is not None or "transformer_blocks.0.norm1.linear.weight" in source.state


_BLOCK_KEYS = {
    "norm1.linear.": "adaLN_modulation.1.",
    "attn1.to_out.0.": "attn.proj.",
    "ff.net.0.proj.": "mlp.fc1.",
    "ff.net.2.": "mlp.fc2.",
}
_TOP_KEYS = {
    "pos_embed.proj.": "x_embedder.proj.",
    "proj_out_1.": "final_layer.adaLN_modulation.1.",
    "proj_out_2.": "final_layer.linear.",
}
_EMBED_KEYS = {
    "timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "class_embedder.embedding_table.": "y_embedder.embedding_table.",
}


def build(source: Source, overrides: dict) -> tuple[State, DiTConfig, list[str]]:
    """DiTTransformer2DModel -> DiT keys: q, k, v concatenated into qkv; the per-block copies of the
    timestep/label embedders must be identical (converted DiT weights always are) and become one."""
    state, config = source.state, source.config or {}
    notes = []
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise FlexDiTError(f"diffusers norm_type {config['norm_type']!r} is not a DiT; only ada_norm_zero is")
    out, renamed = {}, set()
    depth = len(block_indices(state, r"transformer_blocks\.(\d+)\."))
    for i in range(depth):
        src = f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [state.get(f"{src}attn1.to_{n}.{part}") for n in "qkv"]
            if any(t is None for t in qkv):
                raise FlexDiTError(f"diffusers block {i} has no attn1.to_q/to_k/to_v {part}; not a DiT transformer")
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(qkv, dim=0)
            renamed.update(f"{src}attn1.to_{n}.{part}" for n in "qkv")
        for theirs, ours in _BLOCK_KEYS.items():
            for k in [k for k in state if k.startswith(src + theirs)]:
                out[f"blocks.{i}.{ours}{k[len(src + theirs):]}"] = state[k]
                renamed.add(k)
        for theirs, ours in _EMBED_KEYS.items():
            for k in [k for k in state if k.startswith(f"{src}norm1.emb.{theirs}")]:
                key = ours + k[len(f"{src}norm1.emb.{theirs}"):]
                if key in out and not torch.equal(out[key], state[k]):
                    raise FlexDiTError(f"diffusers block {i} has its own {theirs.rstrip('.')} weights that differ "
                                       "from block 0's; a DiT shares one embedder, so this model cannot be loaded")
                out[key] = state[k]
                renamed.add(k)
    for theirs, ours in _TOP_KEYS.items():
        for k in [k for k in state if k.startswith(theirs)]:
            out[ours + k[len(theirs):]] = state[k]
            renamed.add(k)
    leftover = sorted(set(state) - renamed - {"pos_embed.pos_embed"})
    if leftover:
        raise FlexDiTError(f"diffusers keys flexdit cannot map (e.g. {leftover[0]}); "
                           "only DiTTransformer2DModel without cross-attention is supported")

    patch = shape(out, "x_embedder.proj.weight")[2]
    if "input_size" not in overrides and "sample_size" in config:
        overrides = {**overrides, "input_size": config["sample_size"]}
    if "input_size" not in overrides:
        raise FlexDiTError("a bare diffusers state dict does not record the latent size; pass input_size= "
                           "(e.g. 32 for 256 px images)")
    size = overrides["input_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if "num_heads" not in overrides and "num_attention_heads" in config:
        overrides = {**overrides, "num_heads": config["num_attention_heads"]}
    common = common_config(out, overrides, (h // patch) * (w // patch))
    eps = config.get("norm_eps", 1e-5)
    if eps != 1e-6:
        notes.append(f"diffusers config norm_eps={eps} for the MLP norm; flexdit uses DiT's 1e-6")
    if common["timestep_freq_shift"] == 0:
        notes.append("timestep frequencies as the original DiT (diffusers' port uses timestep_freq_shift=1)")
    dit_config = DiTConfig(**common, layout=Layout.dense(depth).kinds)
    out["pos_embed"] = sincos_pos_embed_2d(dit_config.hidden_size, *dit_config.token_grid)[None]
    return out, dit_config, notes

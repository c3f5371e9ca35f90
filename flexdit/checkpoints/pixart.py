"""PixArt-alpha/PixArt-alpha files: `.pth` holding {"state_dict": ...} (training files may add "state_dict_ema").
Our PixArt keeps the original key names, so only the config is inferred: from the shapes, and the position scale from
the stored `pos_embed` buffer (not loaded: the model recomputes it)."""
import math

import torch

from flexdit.checkpoints.files import Source, State
from flexdit.checkpoints.infer import block_indices, heads, input_size, shape
from flexdit.errors import FlexDiTError
from flexdit.models.layout import Layout
from flexdit.models.pixart import PixArtConfig
from flexdit.nn.embed import sincos_pos_embed_2d

NAME = "pixart"
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # position scales ("lewei_scale") to recognise in a stored pos_embed
DIT_ONLY = ("num_classes", "timestep_freq_shift")


def matches(source: Source) -> bool:
    return "t_block.1.weight" in source.state and "y_embedder.y_proj.fc1.weight" in source.state


def build(source: Source, overrides: dict) -> tuple[State, PixArtConfig, list[str]]:
    refuse_dit_options(overrides)
    state = dict(source.state)
    stored_positions = state.pop("pos_embed", None)
    hidden, in_channels, patch, _ = shape(state, "x_embedder.proj.weight")
    out_channels = shape(state, "final_layer.linear.weight")[0] // (patch * patch)
    caption_channels = shape(state, "y_embedder.y_proj.fc1.weight")[1]
    null = state.get("y_embedder.y_embedding")
    micro = "csize_embedder.mlp.0.weight" in state
    size = _latent_size(stored_positions, patch, micro, overrides)
    config = PixArtConfig(
        input_size=size, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        num_heads=heads(hidden, overrides), mlp_ratio=shape(state, "blocks.0.mlp.fc1.weight")[0] / hidden,
        caption_channels=caption_channels, caption_length=120 if null is None else null.shape[0],
        learn_sigma=out_channels == 2 * in_channels, micro_conditions=micro, learned_null_caption=null is not None,
        interpolation_scale=1.0, layout=Layout.dense(len(block_indices(state, r"blocks\.(\d+)\."))).kinds)
    scale, note = _position_scale(stored_positions, config)
    config.interpolation_scale = scale
    return state, config, [note] if note else []


def refuse_dit_options(overrides: dict) -> None:
    given = [k for k in DIT_ONLY if k in overrides]
    if given:
        raise FlexDiTError(f"{given[0]} applies to class-conditional DiT checkpoints, not to PixArt; drop it")


def _latent_size(positions: torch.Tensor | None, patch: int, micro: bool, overrides: dict) -> tuple[int, int]:
    """The latent (H, W) the model was trained at: given, or read from the stored positions (square), or the
    1024-MS form's 128."""
    if positions is not None and positions.dim() == 3:
        return input_size(positions.shape[1], patch, overrides)
    if "input_size" in overrides:
        size = overrides["input_size"]
        return (size, size) if isinstance(size, int) else tuple(size)
    if micro:
        return 128, 128
    raise FlexDiTError("this PixArt file stores no pos_embed, so its latent size is unknown; pass input_size= "
                       "(--input-size, e.g. 64 for 512 px)")


def _position_scale(positions: torch.Tensor | None, config: PixArtConfig) -> tuple[float, str | None]:
    """The position scale the stored buffer was built with; a zero or absent buffer (PixArtMS files) gives the
    released models' rule: positions span [0, 32) tokens, i.e. scale = latent side / 64."""
    default = config.input_size[0] / 64
    if positions is not None and positions.abs().max() > 0:
        for scale in SCALES:
            expected = sincos_pos_embed_2d(config.hidden_size, *config.token_grid, config.base_size, scale)
            if math.isclose(float((positions[0].float() - expected).abs().max()), 0, abs_tol=1e-4):
                return scale, None
        raise FlexDiTError("the file's stored pos_embed matches no position scale flexdit knows "
                           f"({', '.join(map(str, SCALES))}); the file is damaged or from a modified PixArt")
    return default, f"no stored positions: position scale {default} (latent side / 64, as the released models)"

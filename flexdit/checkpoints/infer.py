"""A DiT-family model's config from the shapes of its tensors (in DiT key names), for the formats that do not
record one: the original DiT, SparseDiT and diffusers state dicts (and the original PixArt's, which shares them)."""
import math
import re

from flexdit.checkpoints.files import State
from flexdit.errors import FlexDiTError
from flexdit.models.dit import HEADS_BY_HIDDEN


def shape(state: State, key: str) -> tuple[int, ...]:
    if key not in state:
        raise FlexDiTError(f"checkpoint is missing {key!r}; it is not a complete DiT-family model")
    return tuple(state[key].shape)


def block_indices(state: State, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def common_config(state: State, overrides: dict, tokens: int) -> dict:
    """DiTConfig arguments shared by every DiT-family file: all but the layout and density."""
    hidden, in_channels, patch, _ = shape(state, "x_embedder.proj.weight")
    out_features = shape(state, "final_layer.linear.weight")[0]
    out_channels = out_features // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels) or out_channels * patch * patch != out_features:
        raise FlexDiTError(f"final layer of {out_features} outputs fits neither {in_channels} nor "
                           f"{2 * in_channels} channels at patch size {patch}; the checkpoint is inconsistent")
    num_classes, dropout = _num_classes(shape(state, "y_embedder.embedding_table.weight")[0], overrides)
    fc1 = next((v for k, v in state.items() if k.endswith("mlp.fc1.weight")), None)
    return dict(
        input_size=input_size(tokens, patch, overrides), patch_size=patch, in_channels=in_channels,
        hidden_size=hidden, num_heads=heads(hidden, overrides),
        mlp_ratio=fc1.shape[0] / hidden if fc1 is not None else 4.0,
        num_classes=num_classes, class_dropout_prob=dropout, learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=int(overrides.get("timestep_freq_shift", 0)),
    )


def heads(hidden: int, overrides: dict) -> int:
    n = overrides.get("num_heads") or HEADS_BY_HIDDEN.get(hidden)
    if n is None:
        raise FlexDiTError(f"hidden size {hidden} is not a standard size, so the number of heads is unknown; "
                           "pass num_heads= (--num-heads)")
    if hidden % n:
        raise FlexDiTError(f"num_heads={n} does not divide the hidden size {hidden}; pass a divisor")
    return n


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


def input_size(tokens: int, patch: int, overrides: dict) -> tuple[int, int]:
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

"""The SparseDiT/FlexDiT authors' code: poolingformer_blocks, then dumbbell_blocks (token merge, semantic,
token recover and normal blocks), then normal_blocks; renamed to our flat `blocks.{i}` in execution order."""
import re

from flexdit.checkpoints.files import Source, State
from flexdit.checkpoints.infer import block_indices, common_config, shape
from flexdit.errors import FlexDiTError
from flexdit.models.dit import DiTConfig
from flexdit.models.layout import Layout
from flexdit.nn.blocks import DENSE, GEN, POOL, RECOVER, SPARSE
from flexdit.schedule import FixedGrid

NAME = "sparsedit"


def matches(source: Source) -> bool:
    return any(k.startswith(("poolingformer_blocks.", "dumbbell_blocks.")) for k in source.state)


def build(source: Source, overrides: dict) -> tuple[State, DiTConfig, list[str]]:
    """Authors' module tree -> our flat `blocks.{i}` with kinds, in their execution order."""
    state = source.state
    if any(k.startswith("relative_pos_embedder.") for k in state):
        raise FlexDiTError("this SparseDiT checkpoint uses the relative position bias option (attn_relat_pos), "
                           "which flexdit does not support")
    order: list[tuple[str, str]] = [(f"poolingformer_blocks.{i}.", POOL)
                                    for i in block_indices(state, r"poolingformer_blocks\.(\d+)\.")]
    groups = (("token_merge_blocks", GEN), ("semantic_blocks", SPARSE), ("token_recover_blocks", RECOVER),
              ("normal_blocks", DENSE))
    for d in block_indices(state, r"dumbbell_blocks\.(\d+)\."):
        for group, kind in groups:
            prefix = f"dumbbell_blocks.{d}.{group}."
            order += [(f"{prefix}{j}.", kind) for j in block_indices(state, re.escape(prefix) + r"(\d+)\.")]
    order += [(f"normal_blocks.{i}.", DENSE) for i in block_indices(state, r"normal_blocks\.(\d+)\.")]

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
    config = common_config(renamed, overrides, shape(renamed, "pos_embed")[1])
    notes = [f"SparseDiT layout {layout}; sparse grid {grid.height}x{grid.width} (the released code's fixed grid)"]
    return renamed, DiTConfig(**config, layout=layout.kinds, density=grid.to_dict()), notes

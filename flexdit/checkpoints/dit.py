"""facebookresearch/DiT state dicts: our key names are theirs, so only the config is inferred (from shapes)."""
from flexdit.checkpoints.files import Source, State
from flexdit.checkpoints.infer import block_indices, common_config, shape
from flexdit.errors import FlexDiTError
from flexdit.models.dit import DiT, DiTConfig
from flexdit.models.layout import Layout

NAME = "dit"


def matches(source: Source) -> bool:
    return "x_embedder.proj.weight" in source.state and any(k.startswith("blocks.") for k in source.state)


def build(source: Source, overrides: dict) -> tuple[State, DiTConfig, list[str]]:
    state = source.state
    depth = len(block_indices(state, r"blocks\.(\d+)\."))
    config = common_config(state, overrides, shape(state, "pos_embed")[1])
    return state, DiTConfig(**config, layout=Layout.dense(depth).kinds), []


def dit_state_dict(model: DiT) -> State:
    """The state dict in facebookresearch/DiT's key layout (dense models only)."""
    if not model.layout.is_dense:
        raise FlexDiTError("only a dense model can be written in the original DiT key layout")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

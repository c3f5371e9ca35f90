"""Vchitect/Latte files: {"ema": ..., "model": ...} (EMA first, as the original sample scripts read them), the
unconditional FaceForensics / SkyTimelapse / Taichi-HD models and the class-conditional UCF101 one. Spatial and
temporal blocks alternate in one `blocks` list; frames, latent size and classes are read from the tensors
(flexdit.models.latte.config_from_original)."""
from flexdit.checkpoints.files import Source, State
from flexdit.models.latte import LatteConfig, config_from_original, state_from_original

NAME = "latte"


def matches(source: Source) -> bool:
    return "temp_embed" in source.state and "x_embedder.proj.weight" in source.state


def build(source: Source, overrides: dict) -> tuple[State, LatteConfig, list[str]]:
    config = config_from_original(source.state, overrides)
    return state_from_original(source.state, config), config, []

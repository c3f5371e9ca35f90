"""diffusers LatteTransformer3DModel: a model folder (config.json + weights) or the transformer/ folder of a
LattePipeline folder (e.g. maxin-cn/Latte-1, the text-to-video form). The key mapping lives with the model
(flexdit.models.latte.state_from_diffusers)."""
from dataclasses import replace

from flexdit.checkpoints.files import Source, State
from flexdit.errors import FlexDiTError
from flexdit.models.latte import LatteConfig, config_from_diffusers, state_from_diffusers

NAME = "diffusers-latte"
CLASS_NAME = "LatteTransformer3DModel"


def matches(source: Source) -> bool:
    config = source.config or {}
    return config.get("_class_name") == CLASS_NAME or "temporal_transformer_blocks.0.attn1.to_q.weight" in source.state


def build(source: Source, overrides: dict) -> tuple[State, LatteConfig, list[str]]:
    if source.config is None:
        raise FlexDiTError(f"{source.path} is a bare diffusers Latte state dict, which does not record the model's "
                           "config; load the transformer folder (config.json + weights) instead")
    config = config_from_diffusers(source.config)
    unused = sorted(k for k in overrides if k not in ("frames",))
    if unused:
        raise FlexDiTError(f"{unused[0]} is read from the diffusers config.json; drop it")
    if "frames" in overrides:  # diffusers' Latte runs any number of frames up to its video_length
        config = replace(config, frames=overrides["frames"])
    notes = ["diffusers Latte files carry no learned null caption: guide with the T5 encoding of the empty prompt"]
    return state_from_diffusers(source.state, config), config, notes

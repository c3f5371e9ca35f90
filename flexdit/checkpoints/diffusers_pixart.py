"""diffusers PixArtTransformer2DModel: a model folder (config.json + weights) or the transformer/ folder of a
PixArtAlphaPipeline folder (e.g. PixArt-alpha/PixArt-XL-2-512x512). The key mapping lives with the model
(flexdit.models.pixart.state_from_diffusers)."""
from flexdit.checkpoints.files import Source, State
from flexdit.checkpoints.pixart import refuse_dit_options
from flexdit.errors import FlexDiTError
from flexdit.models.pixart import PixArtConfig, config_from_diffusers, state_from_diffusers

NAME = "diffusers-pixart"
CLASS_NAME = "PixArtTransformer2DModel"


def matches(source: Source) -> bool:
    config = source.config or {}
    return config.get("_class_name") == CLASS_NAME or config.get("norm_type") == "ada_norm_single" \
        or "adaln_single.linear.weight" in source.state


def build(source: Source, overrides: dict) -> tuple[State, PixArtConfig, list[str]]:
    refuse_dit_options(overrides)
    if source.config is None:
        raise FlexDiTError(f"{source.path} is a bare diffusers PixArt state dict, which does not record the model's "
                           "config; load the transformer folder (config.json + weights) instead")
    config = config_from_diffusers(source.config)
    if overrides.get("num_heads") not in (None, config.num_heads):
        raise FlexDiTError(f"num_heads={overrides['num_heads']} contradicts the config.json's {config.num_heads} "
                           "heads; drop --num-heads")
    size = overrides.get("input_size")
    if size is not None and ((size, size) if isinstance(size, int) else tuple(size)) != config.input_size:
        raise FlexDiTError(f"input_size={size} contradicts the config.json's sample_size {config.input_size[0]}; "
                           "drop --input-size")
    notes = ["diffusers PixArt files carry no learned null caption: guide with the T5 encoding of the empty "
             "prompt (as diffusers' pipeline does), not null_caption()"]
    return state_from_diffusers(source.state, config), config, notes

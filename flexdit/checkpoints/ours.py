"""Our format: the model's tensors in our key names and its config as JSON, written by `DiT.save` (safetensors
metadata) or by the trainer (torch.save checkpoints with a "model_config" entry)."""
import json
import re

from flexdit.checkpoints.files import Source, State
from flexdit.errors import FlexDiTError
from flexdit.models.core import SAVED_CONFIG_KEY, SAVED_FAMILY_KEY, BackboneConfig
from flexdit.models.families import config_from_dict

NAME = "flexdit"
TRAINING_CONFIG_KEY = "model_config"  # flexdit.training.trainer's checkpoints
TRAINING_FAMILY_KEY = "model_family"


def matches(source: Source) -> bool:
    if _saved_config(source) is not None:
        return True
    if "x_embedder.proj.weight" in source.state and any(re.match(r"blocks\.\d+\.attn\.(v|q|kv)\.", k)
                                                         for k in source.state):
        raise FlexDiTError(f"{source.path} has FlexDiT blocks but no flexdit config; load the file written by "
                           "model.save / flexdit convert")
    return False


def build(source: Source, overrides: dict) -> tuple[State, BackboneConfig, list[str]]:
    try:
        saved = json.loads(_saved_config(source))
    except json.JSONDecodeError as e:
        raise FlexDiTError(f"the flexdit config in {source.path} is not valid JSON ({e})") from None
    family = source.metadata.get(SAVED_FAMILY_KEY) or source.metadata.get(TRAINING_FAMILY_KEY) or "dit"
    if not isinstance(saved, dict):
        raise FlexDiTError(f"the flexdit config in {source.path} is a JSON {type(saved).__name__}, not an object")
    for key in ("num_heads", "num_classes", "timestep_freq_shift"):
        if key in overrides and overrides[key] != saved.get(key):
            raise FlexDiTError(f"{key}={overrides[key]} contradicts the checkpoint's {key}={saved.get(key)}")
    if "input_size" in overrides:
        size = overrides["input_size"]
        size = [size, size] if isinstance(size, int) else list(size)
        if size != saved.get("input_size"):
            raise FlexDiTError(f"input_size={size} contradicts the checkpoint's input_size={saved.get('input_size')}")
    try:
        return source.state, config_from_dict(saved, family), []
    except (TypeError, ValueError, KeyError) as e:  # a config edited by hand, or from another program
        raise FlexDiTError(f"the flexdit config in {source.path} is not a valid model config ({e})") from None


def _saved_config(source: Source) -> str | None:
    return source.metadata.get(SAVED_CONFIG_KEY) or source.metadata.get(TRAINING_CONFIG_KEY)

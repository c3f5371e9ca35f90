"""flexdit: FlexDiT token-density control for diffusion transformers (arXiv 2412.06028)."""
from flexdit.checkpoints import load, load_checkpoint, save_model
from flexdit.diffusers_interop import to_diffusers
from flexdit.errors import FlexDiTError
from flexdit.models.dit import DiT, DiTConfig, create_model, model_config
from flexdit.models.from_dense import flexdit_from_dense
from flexdit.models.pixart import PixArt, PixArtConfig, pixart_config
from flexdit.models.layout import Layout
from flexdit.schedule import DensitySchedule, FixedGrid, TimestepIntervals

__version__ = "0.1.0"
__all__ = [
    "DiT", "DiTConfig", "DensitySchedule", "FixedGrid", "FlexDiTError", "Layout", "PixArt", "PixArtConfig",
    "TimestepIntervals", "create_model", "flexdit_from_dense", "load", "load_checkpoint", "model_config",
    "pixart_config", "save_model", "to_diffusers",
]

"""The image autoencoder of latent DiTs: a diffusers AutoencoderKL read from a local folder."""
from pathlib import Path

import torch

from flexdit.errors import FlexDiTError

LATENT_SCALE = 0.18215  # sd-vae-ft-ema/mse latents as DiT uses them


def load_vae(path: str, device: torch.device | str = "cpu"):
    """A diffusers AutoencoderKL from a local folder (sd-vae-ft-ema / -mse layout), in eval mode."""
    if not (Path(path) / "config.json").is_file():
        raise FlexDiTError(f"VAE folder not found or without config.json: {path}; give a local diffusers "
                           "AutoencoderKL folder (e.g. sd-vae-ft-ema) or --vae none")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise FlexDiTError("the VAE is diffusers' AutoencoderKL: pip install diffusers") from None
    try:
        return AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise FlexDiTError(f"cannot load the VAE at {path}: {str(e).splitlines()[0]}") from None

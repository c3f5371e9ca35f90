"""Embeddings of DiT and PixArt-alpha: patches, timesteps, class labels, fixed 2-D sin-cos positions.

Parameter names follow facebookresearch/DiT (x_embedder.proj, t_embedder.mlp, y_embedder.embedding_table)
so that official checkpoints load as they are.
"""
import math

import torch
import torch.nn as nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) latent -> (B, N, D) tokens, one per p x p patch, N = (H / p) * (W / p)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)


def unpatchify(x: torch.Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """The inverse layout of PatchEmbed for a head's output: (B, N, p * p * C) on an (h, w) grid -> (B, C, h p, w p);
    each token's features are ordered (patch row, patch column, channel)."""
    (h, w), p = grid, patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, h * p, w * p)


def timestep_frequencies(t: torch.Tensor, dim: int, freq_shift: int = 0, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) [cos | sin] features, as GLIDE/DiT compute them.

    freq_shift=0 is the original DiT; diffusers' DiT port divides by (half - 1) instead (freq_shift=1).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """(B,) timesteps -> (B, D): sinusoidal features through a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_frequencies(t, self.frequency_embedding_size, self.freq_shift)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """(B,) class ids -> (B, D). Row `num_classes` is the null class used by classifier-free guidance.

    The label dropout that trains the null class (probability `dropout_prob`) is applied by the trainer
    with its own generator, so the forward pass holds no hidden randomness and training resumes exactly.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int | None = None,
                        interpolation_scale: float = 1.0) -> torch.Tensor:
    """Fixed (grid_h * grid_w, dim) positions, row-major: first half encodes the column, second the row.

    Computed in float64 and rounded once, as MAE/DiT do, so square grids match official checkpoints bit for bit.
    With `base_size` (PixArt-alpha), each axis of n tokens is stretched to span [0, base_size / interpolation_scale):
    position i is i / (n / base_size) / interpolation_scale, formed in float32 as PixArt and diffusers form it.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a hidden size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)

    def axis(n: int) -> torch.Tensor:
        if base_size is None:
            return torch.arange(n, dtype=torch.float64)
        return (torch.arange(n, dtype=torch.float32) / (n / base_size) / interpolation_scale).double()

    rows, cols = torch.meshgrid(axis(grid_h), axis(grid_w), indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]  # (N, dim/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()

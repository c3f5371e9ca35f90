"""PixArt-alpha's pieces: the adaLN-single block with text cross-attention, its final layer, the caption embedder.

Parameter names follow PixArt-alpha/PixArt-alpha (diffusion/model/nets/PixArt_blocks.py), so its checkpoints load
as they are. The block's token mixer is the kind's (`token_mixer`), as in DiT's Block: a FlexDiT layout changes the
self-attention only; every block, dense or sparse, then cross-attends to the caption.
"""
import torch
import torch.nn as nn

from flexdit.nn.attention import attend
from flexdit.nn.blocks import RECOVER, DenseMerge, Mlp, mixer_residual, mlp_residual, modulate, token_mixer
from flexdit.nn.density import Grid


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def table_modulation(table: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """adaLN-single: a block's own (k, D) table plus the shared (B, k * D) timestep vector -> k terms of (B, D)."""
    return (table[None] + t.reshape(t.shape[0], *table.shape)).unbind(dim=1)


class CaptionCrossAttention(nn.Module):
    """Image tokens (B, N, D) attend to caption tokens (B, L, D); caption_mask (B, L) bool, True = a real token."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim, bias=True)
        self.kv_linear = nn.Linear(dim, 2 * dim, bias=True)  # [k | v]
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor | None) -> torch.Tensor:
        k, v = self.kv_linear(caption).chunk(2, dim=-1)
        return self.proj(attend(self.q_linear(x), k, v, self.num_heads, caption_mask))


class PixArtBlock(nn.Module):
    """x + gate * mixer(modulate(norm1(x))), x + cross_attn(x, caption) (no norm, no gate), then
    x + gate * mlp(modulate(norm2(x))); the modulation is the block's `scale_shift_table` plus the shared t0.

    Mixer kinds behave as in DiT's Block: cross-grid keys/values (`context`) share norm1 and the modulation, a
    pooling block modulates the one mean token, a recovery block first merges the sparse context into x.
    """

    def __init__(self, kind: str, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.kind = kind
        self.norm1 = _layer_norm(hidden_size)
        self.attn = token_mixer(kind, hidden_size, num_heads)
        self.cross_attn = CaptionCrossAttention(hidden_size, num_heads)
        self.norm2 = _layer_norm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; set by the model's initialisation
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))
        self.merge = DenseMerge(hidden_size) if kind == RECOVER else None

    def forward(self, x: torch.Tensor, t0: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor | None,
                context: torch.Tensor | None = None, grids: tuple[Grid, Grid] | None = None) -> torch.Tensor:
        """x (B, N, D), t0 (B, 6D), caption (B, L, D) -> (B, N, D)."""
        terms = table_modulation(self.scale_shift_table, t0)  # shift, scale, gate of the mixer, then of the MLP
        x = mixer_residual(self, x, *terms[:3], context, grids)
        x = x + self.cross_attn(x, caption, caption_mask)  # no norm, no gate
        return mlp_residual(self, x, *terms[3:])


class T2IFinalLayer(nn.Module):
    """norm, modulation by the (2, D) table plus the raw timestep embedding (no SiLU, no Linear), then the linear
    map to p * p * out_channels patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))  # rows: shift, scale

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(dim=1)  # t (B, D) added to both rows
        return self.linear(modulate(self.norm_final(x), shift, scale))


class CaptionEmbedder(nn.Module):
    """(B, L, C) T5 caption embeddings -> (B, L, D); holds the (L0, C) null caption of classifier-free guidance.

    As in PixArt-alpha the null caption `y_embedding` is a buffer (saved with the model, not trained) and caption
    dropout is the trainer's job. Diffusers checkpoints carry no null caption: `learned_null_caption=False`.
    """

    def __init__(self, in_channels: int, hidden_size: int, caption_length: int, learned_null_caption: bool = True):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)  # C -> D -> D, as PixArt's timm Mlp
        null = torch.zeros(caption_length, in_channels) if learned_null_caption else None
        self.register_buffer("y_embedding", null, persistent=True)  # (L0, C); None: not in the state dict

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)

"""Latte's spatial/temporal pairs: one module per layout entry, which the FlexDiT core runs like any block.

A pair is its spatial block, with the layout entry's kind and its parameters directly under `blocks.{i}.`
(DiT's adaLN-Zero Block for the original Latte, PixArt's caption block for diffusers' Latte-1), followed by a dense
temporal block under `blocks.{i}.temporal.`: full self-attention over the F frames at every token position the
spatial stage holds (inside an SDTM: the M sparse tokens). Frames are folded into the batch: (B*F, n, D) for the
spatial block, (B*n, F, D) for the temporal one. So the core's pooling and upsampling act per frame unchanged, and
flexdit_from_dense converts a pair as it converts a block (it splits the spatial `attn.qkv` only and copies every
other key, `temporal.*` included).

Conditioning is computed once per sample (B rows) and broadcast to the folded rows, not recomputed per frame or per
token position as the original Latte does: the numbers are the same, the adaLN linears run B times instead of B*F
and B*N times. Frames share their caption, so Latte-1's caption cross-attention runs over all F*n tokens of a sample
at once (its keys and values are projected once per sample instead of once per frame, as diffusers does).
"""
import torch
import torch.nn as nn

from flexdit.nn.attention import SelfAttention
from flexdit.nn.blocks import Block, Mlp, mixer_residual, mlp_residual, modulate
from flexdit.nn.density import Grid
from flexdit.nn.pixart_blocks import PixArtBlock, table_modulation


def sincos_pos_embed_1d(dim: int, length: int) -> torch.Tensor:
    """(length, dim) frame positions 0..length-1: [sin | cos] over dim / 2 frequencies 1 / 10000^(k / (dim / 2)),
    built in float64 as the original Latte (MAE's formula) and diffusers build them."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]  # (length, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def per_row(term: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, D) per-sample term -> (B * rows, D): sample b's term on its folded rows b * rows .. (b + 1) * rows - 1."""
    return term.repeat_interleave(rows, dim=0)


class TemporalBlock(nn.Module):
    """Dense self-attention over frames and an MLP at each token position, modulated by the block's own adaLN-Zero
    linear of c (original Latte) or by its (6, D) `scale_shift_table` plus the shared t0 (Latte-1); never
    cross-attends. Takes and returns the spatial layout (B*F, n, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, table: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if table:  # rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; set by the model's init
            self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))
            self.adaLN_modulation = None
        else:
            self.scale_shift_table = None
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def terms(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Six (B, D) modulation terms from c (B, D) or t0 (B, 6D)."""
        if self.adaLN_modulation is not None:
            return self.adaLN_modulation(cond).chunk(6, dim=1)
        return table_modulation(self.scale_shift_table, cond)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B*F, n, D), cond (B, .), positions (1, F, D) added first (the first pair only) -> (B*F, n, D)."""
        B, (BF, n, D) = cond.shape[0], x.shape
        F = BF // B
        h = x.reshape(B, F, n, D).transpose(1, 2).reshape(B * n, F, D)  # (B*n, F, D)
        if positions is not None:
            h = h + positions
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (per_row(m, n) for m in self.terms(cond))
        h = h + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift_msa, scale_msa))
        h = h + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))
        return h.reshape(B, n, F, D).transpose(1, 2).reshape(BF, n, D)


class LattePair(Block):
    """The original Latte's pair: a DiT adaLN-Zero spatial block of the layout's kind (its parameters are DiT's
    Block's) and an adaLN-Zero temporal block, both conditioned on c = t (+ class) (B, D)."""

    def __init__(self, kind: str, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(kind, hidden_size, num_heads, mlp_ratio)
        self.temporal = TemporalBlock(hidden_size, num_heads, mlp_ratio, table=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor, positions: torch.Tensor | None = None,
                context: torch.Tensor | None = None, grids: tuple[Grid, Grid] | None = None) -> torch.Tensor:
        """x (B*F, n, D) (a recovery pair: the SDTM's dense input, context its sparse tokens), c (B, D)."""
        frames = x.shape[0] // c.shape[0]
        terms = [per_row(m, frames) for m in self.adaLN_modulation(c).chunk(6, dim=1)]  # six (B*F, D)
        x = mixer_residual(self, x, *terms[:3], context, grids)
        x = mlp_residual(self, x, *terms[3:])
        return self.temporal(x, c, positions)


class LatteCaptionPair(PixArtBlock):
    """diffusers' Latte-1 pair: a PixArt spatial block of the layout's kind (self-attention, caption
    cross-attention, MLP; its parameters are PixArtBlock's) and an adaLN-single temporal block, both modulated by
    their own tables plus the shared t0 (B, 6D)."""

    def __init__(self, kind: str, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(kind, hidden_size, num_heads, mlp_ratio)
        self.temporal = TemporalBlock(hidden_size, num_heads, mlp_ratio, table=True)

    def forward(self, x: torch.Tensor, t0: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor | None,
                positions: torch.Tensor | None = None, context: torch.Tensor | None = None,
                grids: tuple[Grid, Grid] | None = None) -> torch.Tensor:
        """x (B*F, n, D), t0 (B, 6D), caption (B, L, D) projected tokens, caption_mask (B, L) bool or None."""
        B = t0.shape[0]
        frames = x.shape[0] // B
        terms = [per_row(m, frames) for m in table_modulation(self.scale_shift_table, t0)]  # six (B*F, D)
        x = mixer_residual(self, x, *terms[:3], context, grids)
        BF, n, D = x.shape
        # Every frame attends to the same caption: one (B, F*n) query batch equals F per-frame ones.
        x = x + self.cross_attn(x.reshape(B, frames * n, D), caption, caption_mask).reshape(BF, n, D)
        x = mlp_residual(self, x, *terms[3:])
        return self.temporal(x, t0, positions)

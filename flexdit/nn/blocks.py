"""The adaLN-Zero block shell. Dense, Poolingformer, sparse-generation, sparse and recovery blocks
are this one shell with a different token mixer (and, for recovery, a merge in front).
"""
import torch
import torch.nn as nn

from flexdit.nn.attention import CrossAttention, MeanPoolMixer, SelfAttention
from flexdit.nn.density import Grid, upsample_tokens

# Block kinds, in the order they appear inside a FlexDiT. One word each, used by layouts and configs.
DENSE, POOL, GEN, SPARSE, RECOVER = "dense", "pool", "gen", "sparse", "recover"
BLOCK_KINDS = (DENSE, POOL, GEN, SPARSE, RECOVER)
CROSS_KINDS = (GEN, RECOVER)  # queries of one grid attend to keys/values of the other


def token_mixer(kind: str, dim: int, num_heads: int) -> nn.Module:
    """The one place a block kind picks its token mixer, for every backbone: Poolingformer blocks mix by an O(N)
    mean, `gen` and `recover` attend across grids (sparse <-> dense), dense and sparse blocks self-attend."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block kind {kind!r}; expected one of {', '.join(BLOCK_KINDS)}")
    if kind == POOL:
        return MeanPoolMixer(dim)
    if kind in CROSS_KINDS:
        return CrossAttention(dim, num_heads)
    return SelfAttention(dim, num_heads)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):
    """timm's Mlp: fc1 (dim -> hidden_dim), GELU (tanh), fc2 (hidden_dim -> out_dim, default dim)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DenseMerge(nn.Module):
    """Recovery merge: X_merged = Up(Xs) W1 + X W2. W1 = 0 and W2 = I at initialisation, so X_merged = X.

    Nearest upsampling only repeats tokens, so Up(Xs) W1 = Up(Xs W1): W1 runs on the M sparse tokens
    instead of the N upsampled ones (exact, C^2 (N - M) fewer multiply-adds).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.sparse = nn.Linear(dim, dim, bias=True)  # W1, applied to the upsampled sparse tokens
        self.dense = nn.Linear(dim, dim, bias=True)  # W2, applied to the SDTM's dense input
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        nn.init.zeros_(self.sparse.weight)
        nn.init.zeros_(self.sparse.bias)
        nn.init.eye_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, sparse_grid: Grid, dense_grid: Grid) -> torch.Tensor:
        return upsample_tokens(self.sparse(sparse), sparse_grid, dense_grid) + self.dense(dense)


def mixer_residual(block: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
                   context: torch.Tensor | None = None, grids: tuple[Grid, Grid] | None = None) -> torch.Tensor:
    """x + gate * mixer(modulate(norm1(x))): the token-mixing half of every block kind, with (B, D) modulation terms
    (DiT's Block, PixArtBlock, Latte's spatial blocks). A recovery block merges first; the keys/values of a
    cross-grid mixer (`context`) pass through the same norm1 and modulation as the queries."""
    if block.merge is not None:
        x = block.merge(context, x, *grids)  # (B, N, D) from sparse context (B, M, D) and dense x
    if block.kind == POOL:
        # The modulation is one affine map for all tokens, so it commutes with the pooling mean:
        # normalise, average, then modulate a single token instead of N.
        h = modulate(block.norm1(x).mean(dim=1, keepdim=True), shift, scale)  # (B, 1, C)
    else:
        h = modulate(block.norm1(x), shift, scale)
    if block.kind in CROSS_KINDS:
        mixed = block.attn(h, modulate(block.norm1(context), shift, scale))
    else:
        mixed = block.attn(h)
    return x + gate.unsqueeze(1) * mixed  # a pooling mixer's (B, 1, C) broadcasts over the tokens


def mlp_residual(block: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 gate: torch.Tensor) -> torch.Tensor:
    """x + gate * mlp(modulate(norm2(x))): every block's second half."""
    return x + gate.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift, scale))


class Block(nn.Module):
    """x + gate * mixer(modulate(norm1(x))), then x + gate * mlp(modulate(norm2(x))), conditioned on c (B, D).

    With a cross-attention mixer the keys/values (`context`) pass through the same norm1 and modulation
    as the queries, as in the FlexDiT authors' code. A recovery block first merges: x is the SDTM's dense
    input, context the sparse tokens, and the merged tokens become both the residual stream and the queries.
    """

    def __init__(self, kind: str, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = token_mixer(kind, hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.merge = DenseMerge(hidden_size) if kind == RECOVER else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                grids: tuple[Grid, Grid] | None = None) -> torch.Tensor:
        terms = self.adaLN_modulation(c).chunk(6, dim=1)  # shift, scale, gate of the mixer, then of the MLP
        return mlp_residual(self, mixer_residual(self, x, *terms[:3], context, grids), *terms[3:])


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to p * p * out_channels patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

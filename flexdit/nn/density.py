"""Token-density operations on a token grid, independent of the backbone.

Tokens are (B, N, C) in row-major order over a (H, W) grid. Video backbones fold their frame axis into
the batch (B * F, N, C) before calling these, so the same functions serve images and video.
"""
import torch
import torch.nn.functional as F

Grid = tuple[int, int]


def _to_map(tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
    B, N, C = tokens.shape
    h, w = grid
    if N != h * w:
        raise ValueError(f"{N} tokens do not form a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(B, C, h, w)


def _to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


def pool_tokens(tokens: torch.Tensor, grid: Grid, sparse_grid: Grid) -> torch.Tensor:
    """(B, H*W, C) -> (B, H'*W', C) by adaptive average pooling of the token grid."""
    if tuple(sparse_grid) == tuple(grid):
        return tokens
    return _to_tokens(F.adaptive_avg_pool2d(_to_map(tokens, grid), sparse_grid))


def upsample_tokens(tokens: torch.Tensor, sparse_grid: Grid, grid: Grid) -> torch.Tensor:
    """(B, H'*W', C) -> (B, H*W, C) by nearest-neighbour upsampling (torch's 'nearest' index rule)."""
    if tuple(sparse_grid) == tuple(grid):
        return tokens
    return _to_tokens(F.interpolate(_to_map(tokens, sparse_grid), size=grid, mode="nearest"))

"""Token mixers: self-attention, cross-attention and the O(N) mean-pooling mixer of Poolingformer blocks.

All map (B, N, C) -> (B, N, C). Attention always goes through F.scaled_dot_product_attention.
Parameter names: self-attention `qkv`/`proj` (DiT), cross-attention `q`/`kv`/`proj` and pooling
`v`/`proj` (the FlexDiT authors' code), so every published layout loads by renaming prefixes only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)  # (B, heads, N, head_dim)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of (B, N, C) queries on (B, M, C) keys/values -> (B, N, C).

    key_mask (B, M) bool, True = attend: padded keys get exactly zero weight (every row needs one True).
    """
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M) over heads, queries
    q, k, v = (_split_heads(a, num_heads) for a in (q, k, v))
    return _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(*(_split_heads(a, self.num_heads) for a in (q, k, v)))
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Queries from x (B, N, C), keys and values from context (B, M, C) (key_mask (B, M): see `attend`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        return self.proj(attend(self.q(x), k, v, self.num_heads, key_mask))


class MeanPoolMixer(nn.Module):
    """Poolingformer mixer: every token receives proj(mean over tokens of V), returned once as (B, 1, C)
    for the block to broadcast over the tokens.

    Uniform attention weights make attention the mean of V; since V is linear, mean(x W_v + b) =
    mean(x) W_v + b, so we average first: O(N C + C^2) instead of an N x N matrix.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.v = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.v(x.mean(dim=1, keepdim=True)))  # (B, 1, C)

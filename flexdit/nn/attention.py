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
    """Queries from x (B, N, C), keys and values from context (B, M, C)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        q, k, v = (_split_heads(a, self.num_heads) for a in (self.q(x), k, v))
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


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

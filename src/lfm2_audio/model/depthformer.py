"""The depth transformer: from one backbone state to the 8 codes of an 80 ms audio frame.

`depth_linear` turns the backbone state into 8 slot inputs; slot k also receives the embedding
of the code chosen for codebook k-1; a small causal transformer over the 8 slots gives the
logits of each codebook. Its RMSNorm multiplies the weight in fp32 and its RoPE rotates
interleaved pairs, both unlike the backbone: mixing them up silently breaks the outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lfm2 import FeedForward
from ..config import DEPTH_HEADS, DEPTH_KV_HEADS, DEPTH_NORM_EPS, DEPTH_ROPE_THETA, DepthformerConfig


class RMSNorm(nn.Module):
    """Liquid flavour: the weight is applied in fp32 before casting back."""

    def __init__(self, dim: int, eps: float = DEPTH_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def rope_pairs(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate (x[2i], x[2i+1]) pairs by t * theta^(-2i/d); x [B, S, H, D], positions [S]."""
    d = x.shape[-1]
    freqs = DEPTH_ROPE_THETA ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    angle = positions.float()[:, None] * freqs  # [S, D/2]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # [S, 1, D/2]
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class BoundedAttention(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.q_layernorm = RMSNorm(head_dim)
        self.k_layernorm = RMSNorm(head_dim)


class DepthAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.head_dim = dim // DEPTH_HEADS
        self.qkv_proj = nn.Linear(dim, (DEPTH_HEADS + 2 * DEPTH_KV_HEADS) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.bounded_attention = BoundedAttention(self.head_dim)

    def forward(self, x, start: int = 0, cache=None):
        """x [B, S, dim]; with cache=(K, V) [B, kv, 8, hd] the S positions start at `start`."""
        B, S, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv_proj(x).split([DEPTH_HEADS * hd, DEPTH_KV_HEADS * hd, DEPTH_KV_HEADS * hd], dim=-1)
        norms = self.bounded_attention
        q = norms.q_layernorm(q.view(B, S, DEPTH_HEADS, hd))
        k = norms.k_layernorm(k.view(B, S, DEPTH_KV_HEADS, hd))
        pos = torch.arange(start, start + S, device=x.device)
        q, k = rope_pairs(q, pos).transpose(1, 2), rope_pairs(k, pos).transpose(1, 2)
        v = v.view(B, S, DEPTH_KV_HEADS, hd).transpose(1, 2)
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, start : start + S] = k
            v_cache[:, :, start : start + S] = v
            k, v = k_cache[:, :, : start + S], v_cache[:, :, : start + S]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, -1))


class DepthBlock(nn.Module):
    def __init__(self, cfg: DepthformerConfig):
        super().__init__()
        self.operator_norm = RMSNorm(cfg.dim)
        self.operator = DepthAttention(cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, start=0, cache=None):
        x = x + self.operator(self.operator_norm(x), start, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Depthformer(nn.Module):
    def __init__(self, cfg: DepthformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DepthBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x, start: int = 0, caches=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, start, caches[i] if caches is not None else None)
        return x

    def new_caches(self, batch: int, slots: int, dtype, device):
        shape = (batch, DEPTH_KV_HEADS, slots, self.cfg.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in self.layers]


class SharedEmbedding(nn.Module):
    """A code table used both ways: `embedding` to feed codes in, `to_logits` (optionally the same
    matrix) after `embedding_norm` to predict them."""

    def __init__(self, vocab: int, dim: int, tie: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.embedding_norm = RMSNorm(dim)
        self.tie = tie
        if not tie:
            self.to_logits = nn.Linear(dim, vocab, bias=False)

    def logits_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.tie else self.to_logits.weight

    def get_logits(self, h):
        return self.embedding_norm(h) @ self.logits_weight().T

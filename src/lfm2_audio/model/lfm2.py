"""The LFM2 backbone: gated short convolutions and grouped-query attention, with our own caches.

Parameter names match transformers' `Lfm2Model` (and so the official checkpoints under `lfm.`).
The cache is preallocated: conv layers keep the last (kernel - 1) gated inputs, attention layers
write K/V into fixed buffers at each row's own position, so a decode step never copies history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Lfm2Config


class RMSNorm(nn.Module):
    """transformers' flavour: normalise in fp32, cast back, then scale in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, dtype: torch.dtype) -> torch.Tensor:
    # The reference casts the whole model, rotary buffer included, to its dtype: round inv_freq
    # the same way so bf16 runs give the same greedy tokens.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv.to(dtype).float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [B, S] -> cos, sin [B, 1, S, head_dim] in rotate-half layout."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class Lfm2Cache:
    """Decode state for B rows. `lengths` [B] counts the positions each row has seen; `max_len`
    is the same maximum kept on the host so slicing the K/V buffers needs no device sync."""

    conv: list[torch.Tensor]  # per conv layer [B, hidden, kernel - 1]
    keys: list[torch.Tensor]  # per attention layer [B, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    lengths: torch.Tensor
    max_len: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 1 << 62

    def load(self, other: "Lfm2Cache") -> None:
        """Take `other`'s state into this cache's own buffers (a one-row `other` fills every row):
        a larger cache grown from a smaller one, or beam rows started from one prompt."""
        used = other.max_len
        for dst, src in zip(self.keys + self.values, other.keys + other.values):
            dst[:, :, :used] = src[:, :, :used]
        for dst, src in zip(self.conv, other.conv):
            dst.copy_(src)
        self.lengths.copy_(other.lengths)
        self.max_len = used

    def reset(self, rows=None) -> None:
        """Forget rows (all by default) so their slots can start a new sequence."""
        rows = slice(None) if rows is None else rows
        for s in self.conv:
            s[rows] = 0
        self.lengths[rows] = 0
        if isinstance(rows, slice):
            self.max_len = 0


class ShortConv(nn.Module):
    def __init__(self, cfg: Lfm2Config):
        super().__init__()
        d, k = cfg.hidden_size, cfg.conv_L_cache
        self.in_proj = nn.Linear(d, 3 * d, bias=cfg.conv_bias)
        self.conv = nn.Conv1d(d, d, k, groups=d, bias=cfg.conv_bias, padding=0)
        self.out_proj = nn.Linear(d, d, bias=cfg.conv_bias)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        b_gate, c_gate, xv = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)
        u = b_gate * xv  # [B, D, S]
        k = self.conv.kernel_size[0]
        history = state if state is not None else u.new_zeros(u.shape[0], u.shape[1], k - 1)
        u = torch.cat((history.to(u.dtype), u), dim=2)
        if state is not None:
            state.copy_(u[:, :, -(k - 1):])
        v = self.conv(u)
        return self.out_proj((c_gate * v).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, cfg: Lfm2Config):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.q_layernorm = RMSNorm(hd, cfg.norm_eps)
        self.k_layernorm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, positions, kv=None, kv_len=None, window=None):
        B, S, _ = x.shape
        q = self.q_layernorm(self.q_proj(x).view(B, S, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_layernorm(self.k_proj(x).view(B, S, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        if kv is None:
            key_pos = positions  # no cache: keys are exactly this chunk
        else:
            k_cache, v_cache = kv
            rows = torch.arange(B, device=x.device)[:, None]
            k_cache[rows, :, positions] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, positions] = v.transpose(1, 2).to(v_cache.dtype)
            k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
            key_pos = torch.arange(kv_len, device=x.device).expand(B, kv_len)
        if kv is None and window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rel = positions[:, :, None] - key_pos[:, None, :]  # [B, S, K]
            mask = rel >= 0
            if window is not None:
                mask &= rel < window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    def __init__(self, cfg: Lfm2Config, attention: bool):
        super().__init__()
        self.is_attention = attention
        if attention:
            self.self_attn = Attention(cfg)
        else:
            self.conv = ShortConv(cfg)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.ffn_dim)
        self.operator_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Lfm2Model(nn.Module):
    def __init__(self, cfg: Lfm2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, cfg.is_attention(i)) for i in range(cfg.num_hidden_layers))
        self.embedding_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def new_cache(self, batch: int, capacity: int, dtype=None, device=None) -> Lfm2Cache:
        p = self.embed_tokens.weight
        dtype, device = dtype or p.dtype, device or p.device
        cfg = self.cfg
        conv, keys, values = [], [], []
        for layer in self.layers:
            if layer.is_attention:
                shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
                keys.append(torch.zeros(shape, dtype=dtype, device=device))
                values.append(torch.zeros(shape, dtype=dtype, device=device))
            else:
                conv.append(torch.zeros(batch, cfg.hidden_size, cfg.conv_L_cache - 1, dtype=dtype, device=device))
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        return Lfm2Cache(conv, keys, values, lengths)

    def forward(self, x: torch.Tensor, cache: Lfm2Cache | None = None, window: int | None = None) -> torch.Tensor:
        """x: input embeddings [B, S, D] -> final hidden states [B, S, D] (after the last norm).

        With a cache, the S new positions of every row follow that row's history and the cache
        is advanced; without one, x is a whole sequence starting at position 0.
        """
        B, S, _ = x.shape
        offsets = cache.lengths if cache is not None else torch.zeros(B, dtype=torch.long, device=x.device)
        positions = offsets[:, None] + torch.arange(S, device=x.device)
        kv_len = None
        if cache is not None:
            kv_len = cache.max_len + S
            if kv_len > cache.capacity:
                raise RuntimeError(f"cache holds {cache.capacity} positions, {kv_len} needed")
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        cos, sin = rope_cos_sin(positions, inv_freq, x.dtype)
        conv_i = attn_i = 0
        for layer in self.layers:
            h = layer.operator_norm(x)
            if layer.is_attention:
                kv = (cache.keys[attn_i], cache.values[attn_i]) if cache is not None else None
                h = layer.self_attn(h, cos, sin, positions, kv, kv_len, window)
                attn_i += 1
            else:
                h = layer.conv(h, cache.conv[conv_i] if cache is not None else None)
                conv_i += 1
            x = x + h
            x = x + layer.feed_forward(layer.ffn_norm(x))
        if cache is not None:
            cache.lengths += S
            cache.max_len = kv_len
        return self.embedding_norm(x)

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        head = getattr(self, "text_head", None)  # an int8 copy of the table (model/quantize.py)
        return head(h) if head is not None else h @ self.embed_tokens.weight.T

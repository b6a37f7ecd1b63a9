"""FastConformer audio encoder: log-mel [B, 128, T] -> one 512-vector per 80 ms.

Depth-wise striding subsampling (8x), then blocks of macaron feed-forwards around Transformer-XL
relative-position attention and a convolution module. Parameter names match the official
checkpoints under `conformer.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConformerConfig


def _time_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # [B, T]


def subsampled_length(lengths: torch.Tensor | int, stages: int):
    for _ in range(stages):
        lengths = (lengths + 1) // 2  # kernel 3, stride 2, padding 1
    return lengths


def pad_clips(features: list[torch.Tensor], dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel clips, each [n_mels, T_i] -> a zero-padded batch [B, n_mels, max T] and the lengths."""
    lengths = torch.tensor([f.shape[-1] for f in features], device=device)
    batch = torch.zeros(len(features), features[0].shape[0], int(lengths.max()), dtype=dtype, device=device)
    for i, f in enumerate(features):
        batch[i, :, : f.shape[-1]] = f.to(dtype)
    return batch, lengths


class Subsampling(nn.Module):
    """dw_striding: Conv2d(1->C, s2), then (depth-wise s2 + point-wise) per extra stage, ReLUs."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        c, stages = cfg.subsampling_conv_channels, cfg.n_subsampling_stages
        layers: list[nn.Module] = [nn.Conv2d(1, c, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c), nn.Conv2d(c, c, 1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.stages = stages
        freq = cfg.feat_in
        for _ in range(stages):
            freq = (freq + 1) // 2
        self.out = nn.Linear(c * freq, cfg.d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        # x [B, feat, T] -> [B, 1, T, feat]; zero padded frames before every layer, as the
        # reference does, so a clip's encoding does not depend on what it is batched with.
        x = x.transpose(1, 2).unsqueeze(1)
        for layer in self.conv:
            if isinstance(layer, nn.Conv2d):
                x = x * _time_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
                x = layer(x)
                if layer.stride[0] == 2:
                    lengths = (lengths + 1) // 2
            else:
                x = layer(x)
        x = x * _time_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
        B, C, T, Fq = x.shape
        return self.out(x.transpose(1, 2).reshape(B, T, C * Fq)), lengths


def relative_positions(n: int, d_model: int, dtype, device) -> torch.Tensor:
    """Sinusoids for relative offsets +(n-1) ... -(n-1): [2n-1, d_model]."""
    pos = torch.arange(n - 1, -n, -1, dtype=torch.float32, device=device)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(2 * n - 1, d_model, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe.to(dtype)


class RelPositionAttention(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        self.h, self.d_k = h, d // h
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(h, self.d_k))

    def forward(self, x, pos_emb, mask):
        B, T, _ = x.shape
        split = lambda t: t.view(B, -1, self.h, self.d_k)  # noqa: E731
        q, k, v = split(self.linear_q(x)), split(self.linear_k(x)), split(self.linear_v(x))
        p = self.linear_pos(pos_emb).view(-1, self.h, self.d_k)  # [2T-1, h, d_k]
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))  # [B, h, T, T]
        bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.permute(1, 2, 0))  # [B, h, T, 2T-1]
        # Column c of bd is relative offset (T-1-c); query i needs offset i-j for key j.
        idx = (T - 1) - torch.arange(T, device=x.device)[:, None] + torch.arange(T, device=x.device)[None, :]
        bd = bd.gather(-1, idx.expand(B, self.h, T, T))
        scores = (ac + bd) / math.sqrt(self.d_k)
        scores = scores.masked_fill(mask[:, None], -10000.0)
        attn = torch.softmax(scores, dim=-1).masked_fill(mask[:, None], 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, -1)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(d, hidden)
        self.linear2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.linear2(F.silu(self.linear1(x)))


class ConvModule(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        d, k = cfg.d_model, cfg.conv_kernel_size
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise_conv = nn.Conv1d(d, d, k, padding=(k - 1) // 2, groups=d)
        self.batch_norm = nn.BatchNorm1d(d, eps=1e-5)
        self.pointwise_conv2 = nn.Conv1d(d, d, 1)

    def forward(self, x, pad_mask):
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        x = x.masked_fill(pad_mask[:, None], 0.0)
        x = F.silu(self.batch_norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        d, ff = cfg.d_model, cfg.d_model * cfg.ff_expansion_factor
        self.norm_feed_forward1 = nn.LayerNorm(d, eps=1e-5)
        self.feed_forward1 = FeedForward(d, ff)
        self.norm_self_att = nn.LayerNorm(d, eps=1e-5)
        self.self_attn = RelPositionAttention(cfg)
        self.norm_conv = nn.LayerNorm(d, eps=1e-5)
        self.conv = ConvModule(cfg)
        self.norm_feed_forward2 = nn.LayerNorm(d, eps=1e-5)
        self.feed_forward2 = FeedForward(d, ff)
        self.norm_out = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x, pos_emb, att_mask, pad_mask):
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        x = x + self.self_attn(self.norm_self_att(x), pos_emb, att_mask)
        x = x + self.conv(self.norm_conv(x), pad_mask)
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_encode = Subsampling(cfg)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.n_layers))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        """features [B, feat_in, T] (zero-padded), lengths [B] -> ([B, T', d_model], lengths')."""
        x, lengths = self.pre_encode(features, lengths)
        T = x.shape[1]
        pos_emb = relative_positions(T, self.cfg.d_model, x.dtype, x.device)
        pad_mask = ~_time_mask(lengths, T)
        att_mask = pad_mask[:, :, None] | pad_mask[:, None, :]
        for layer in self.layers:
            x = layer(x, pos_emb, att_mask, pad_mask)
        return x, lengths

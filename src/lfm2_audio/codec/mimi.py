"""Mimi, Kyutai's neural audio codec: 24 kHz audio <-> 8 codebooks x 12.5 frames per second.

LFM2-Audio emits Mimi codes; this file turns them back into audio (and audio into codes, for
preparing training data). Written from the LFM2-Audio spec (§3.7, §10.1), in plain PyTorch.

    wave [B, 1, N] ─ SEANet encoder (convs, ÷960) ─ transformer ─ conv ÷2 ─ split RVQ ─► codes [B, 8, T]
    codes ─ RVQ tables ─ conv-transpose ×2 ─ transformer ─ SEANet decoder (×960) ─► wave [B, 1920·T]

Everything is causal, so the same modules run offline (whole sequence) and streaming (a few
frames at a time). Every stateful module takes an optional `state` dict: with None it pads
like the offline model; with a dict it keeps its left context there (keyed by the module
itself) and continues from it on the next call. Offline decode is thus exactly streaming decode
started from an empty state, and the two agree to float rounding.

Parameter names follow Kyutai's checkpoint layout (`tokenizer-e351c8d8-checkpoint125.safetensors`),
so the official file loads with a strict, name-for-name `load_state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..weights import check_tensors, empty_modules, read_tensors, tensor_shapes
from . import MIMI_FILE, CodecInterface, check_wave

State = dict  # module -> whatever that module carries between streaming calls


@dataclass
class MimiConfig:
    """Mimi hyper-parameters. Defaults are the released model (hard-coded by Kyutai's loader)."""

    sample_rate: int = 24000
    frame_rate: float = 12.5  # code frames per second
    channels: int = 1
    # SEANet
    dimension: int = 512  # latent width, also the transformers' d_model
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    n_residual_layers: int = 1
    dilation_base: int = 2
    compress: int = 2
    # transformers (encoder side and decoder side are identical)
    num_layers: int = 8
    num_heads: int = 8
    ffn_dim: int = 2048
    context: int = 250  # attention window, in 25 Hz steps (10 s)
    max_period: float = 10000.0  # RoPE
    layer_scale: float = 0.01
    norm_eps: float = 1e-5
    # split residual vector quantizer
    codebook_dim: int = 256
    codebook_size: int = 2048
    n_q: int = 32  # 1 semantic + n_q - 1 acoustic codebooks stored in the file

    def __post_init__(self):
        self.ratios = tuple(int(r) for r in self.ratios)
        if self.channels != 1:
            raise InputError("Mimi is a mono codec (channels must be 1)")
        if self.dimension % self.num_heads or (self.dimension // self.num_heads) % 2:
            raise InputError("Mimi dimension must split into heads of an even size (RoPE rotates pairs)")
        frame = self.sample_rate / self.frame_rate
        if frame != int(frame) or int(frame) % self.hop_length:
            raise InputError(f"Mimi frame ({frame} samples) must be a multiple of the SEANet hop {self.hop_length}")
        if self.resample_stride < 2:
            raise InputError("Mimi needs a learnt resampling stride of at least 2 (the checkpoint has one)")
        if self.context < 1:
            raise InputError("Mimi transformer context must be >= 1")
        if self.n_q < 2:
            raise InputError("Mimi needs at least 2 codebooks (1 semantic + acoustic)")

    @property
    def hop_length(self) -> int:  # samples per SEANet latent step (960 -> 25 Hz)
        return math.prod(self.ratios)

    @property
    def frame_samples(self) -> int:  # samples per code frame (1920)
        return int(self.sample_rate / self.frame_rate)

    @property
    def resample_stride(self) -> int:  # SEANet steps per code frame (2)
        return self.frame_samples // self.hop_length


# ---------------------------------------------------------------------------------------------
# Streamable building blocks


class _Holder(nn.Module):
    """Holds layers under fixed attribute names. Exists only so that state-dict keys match
    Kyutai's, whose conv wrappers nest (e.g. `conv.conv.weight`, `downsample.conv.conv.conv.weight`)."""

    def __init__(self, **layers: nn.Module):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


class Streamable(nn.Module):
    """Marker: forward(x, state) where state is None (offline) or a dict carried across calls."""


def _run(layers, x: torch.Tensor, state: State | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, state) if isinstance(layer, Streamable) else layer(x)
    return x


class CausalConv1d(Streamable):
    """Conv1d that only looks back: left-pad (k_eff - stride), no right pad.

    Input lengths must be multiples of the stride (the codec pads audio to whole frames, so every
    layer sees whole strides). Streaming keeps the last (k_eff - stride) inputs, which is exactly
    the left padding the next chunk needs to see the same windows as one long call.
    """

    def __init__(self, cin, cout, kernel_size, stride=1, dilation=1, groups=1, bias=True, pad_mode="constant"):
        super().__init__()
        self.conv = _Holder(conv=nn.Conv1d(cin, cout, kernel_size, stride, dilation=dilation, groups=groups, bias=bias))
        self.context = (kernel_size - 1) * dilation + 1 - stride
        self.pad_mode = pad_mode  # "constant" (zeros) or "replicate" (repeat the first step)

    def forward(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        if self.context > 0:
            prev = None if state is None else state.get(self)
            if prev is None:  # start of the signal: what the offline model pads with
                if self.pad_mode == "replicate":
                    prev = x[..., :1].expand(-1, -1, self.context)
                else:
                    prev = x.new_zeros(x.shape[0], x.shape[1], self.context)
            x = torch.cat([prev, x], dim=-1)
            if state is not None:
                state[self] = x[..., x.shape[-1] - self.context :].clone()  # clone: don't pin x
        return self.conv.conv(x)


class CausalConvTranspose1d(Streamable):
    """ConvTranspose1d whose full output is trimmed by (k - stride) on the right.

    The trimmed samples are not wrong, only incomplete: they still miss the contribution of the
    next input step. Streaming keeps them (bias removed, so it is added once) and adds them to the
    start of the next chunk's output: overlap-add, equal to one long call.
    """

    def __init__(self, cin, cout, kernel_size, stride=1, groups=1, bias=True):
        super().__init__()
        self.convtr = _Holder(convtr=nn.ConvTranspose1d(cin, cout, kernel_size, stride, groups=groups, bias=bias))
        self.trim = kernel_size - stride

    def forward(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        layer = self.convtr.convtr
        y = self._full(x)  # [B, C, L * stride + trim]
        if self.trim <= 0:
            return y
        keep = y.shape[-1] - self.trim
        if state is not None:
            tail = state.get(self)
            if tail is not None:
                y = torch.cat([y[..., : self.trim] + tail, y[..., self.trim :]], dim=-1)
            tail = y[..., keep:]
            state[self] = tail - layer.bias[:, None] if layer.bias is not None else tail.clone()
        return y[..., :keep]

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        """The untrimmed transposed convolution. For the dense (groups=1) SEANet layers this is one
        GEMM plus an overlap-add: PyTorch's CPU ConvTranspose1d falls back to a slow path for
        short inputs (~100 ms for the 1024->512 layer on a 2-step streaming chunk vs ~5 ms here),
        and is no faster on long ones. Depth-wise layers keep the built-in op (fast already)."""
        layer = self.convtr.convtr
        s, (K,) = layer.stride[0], layer.kernel_size
        if layer.groups != 1 or K % s:
            return layer(x)
        B, C, T = x.shape
        O, m = layer.out_channels, K // s
        # out[:, o, t*s + k] += sum_c x[:, c, t] * w[c, o, k], with k = j*s + r (j < m, r < s)
        y = (x.transpose(1, 2) @ layer.weight.reshape(C, O * K)).view(B, T, O, m, s)
        out = x.new_zeros(B, O, T + m - 1, s)
        for j in range(m):
            out[:, :, j : j + T] += y[:, :, :, j].transpose(1, 2)
        out = out.view(B, O, (T + m - 1) * s)
        return out if layer.bias is None else out + layer.bias[:, None]


class ResidualBlock(Streamable):
    """SEANet residual unit: x + Conv1x1(ELU(Conv_k(ELU(x)))), identity skip ("true skip")."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int):
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                CausalConv1d(dim, hidden, kernel_size, dilation=dilation),
                nn.ELU(),
                CausalConv1d(hidden, dim, 1),
            ]
        )

    def forward(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        return x + _run(self.block, x, state)


class SEANetEncoder(Streamable):
    """Waveform [B, 1, N] -> latent [B, D, N / hop]. Indices in `model` follow Kyutai's layout."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(c.channels, c.n_filters, c.kernel_size)]
        mult = 1
        for ratio in reversed(c.ratios):  # 4, 5, 6, 8: fine time resolution first
            dim = mult * c.n_filters
            for j in range(c.n_residual_layers):
                layers.append(ResidualBlock(dim, c.residual_kernel_size, c.dilation_base**j, c.compress))
            layers += [nn.ELU(), CausalConv1d(dim, dim * 2, 2 * ratio, stride=ratio)]
            mult *= 2
        layers += [nn.ELU(), CausalConv1d(mult * c.n_filters, c.dimension, c.last_kernel_size)]
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        return _run(self.model, x, state)


class SEANetDecoder(Streamable):
    """Latent [B, D, T] -> waveform [B, 1, T * hop]; the mirror of the encoder, no final activation."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        mult = 2 ** len(c.ratios)
        layers: list[nn.Module] = [CausalConv1d(c.dimension, mult * c.n_filters, c.kernel_size)]
        for ratio in c.ratios:  # 8, 6, 5, 4
            dim = mult * c.n_filters
            layers += [nn.ELU(), CausalConvTranspose1d(dim, dim // 2, 2 * ratio, stride=ratio)]
            for j in range(c.n_residual_layers):
                layers.append(ResidualBlock(dim // 2, c.residual_kernel_size, c.dilation_base**j, c.compress))
            mult //= 2
        layers += [nn.ELU(), CausalConv1d(c.n_filters, c.channels, c.last_kernel_size)]
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        return _run(self.model, x, state)


# ---------------------------------------------------------------------------------------------
# Transformer (causal, windowed, RoPE on interleaved pairs)


def _rope(x: torch.Tensor, pos: torch.Tensor, max_period: float) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by pos * max_period^(-2i/d). x [B, H, T, d], pos [T].

    Interleaved pairs, not the rotate-half layout of HF Llama-style code: the checkpoint's q/k
    rows are ordered for this one. Angles in fp32 like the reference.
    """
    d = x.shape[-1]
    inv_freq = torch.exp(torch.arange(0, d, 2, device=x.device, dtype=torch.float32) * (-math.log(max_period) / d))
    angle = pos.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos, sin = angle.cos(), angle.sin()
    xr, xi = x.float().unflatten(-1, (d // 2, 2)).unbind(-1)
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, context: int, max_period: float):
        super().__init__()
        self.num_heads, self.context, self.max_period = num_heads, context, max_period
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))  # rows: q, k, v (Kyutai's fused name)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: State) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, pos, self.max_period), _rope(k, pos, self.max_period)
        kpos = pos
        past = cache.get(self)
        if past is not None:  # keys are cached already rotated, with their absolute positions
            k, v, kpos = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2), torch.cat([past[2], pos])
        delta = pos[:, None] - kpos[None, :]
        allowed = (delta >= 0) & (delta < self.context)  # causal, window of `context` steps incl. self
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        # Later queries sit at positions > pos[-1], so they can use at most the last context-1 keys.
        keep = self.context - 1
        start = k.shape[2] - min(keep, k.shape[2])
        cache[self] = (k[:, :, start:], v[:, :, start:], kpos[start:])
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class TransformerLayer(nn.Module):
    """Pre-norm block: x += γ1·Attn(LN1 x); x += γ2·W2 GELU(W1 LN2 x). No linear biases."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        d = c.dimension
        self.self_attn = Attention(d, c.num_heads, c.context, c.max_period)
        self.norm1 = nn.LayerNorm(d, eps=c.norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=c.norm_eps)
        self.linear1 = nn.Linear(d, c.ffn_dim, bias=False)
        self.linear2 = nn.Linear(c.ffn_dim, d, bias=False)
        self.layer_scale_1 = LayerScale(d, c.layer_scale)
        self.layer_scale_2 = LayerScale(d, c.layer_scale)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: State) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), pos, cache))
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(x)))))


class Transformer(nn.Module):
    def __init__(self, c: MimiConfig):
        super().__init__()
        self.context = c.context
        self.layers = nn.ModuleList([TransformerLayer(c) for _ in range(c.num_layers)])

    def forward(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """x [B, T, D]. Runs in blocks of `context` steps with a KV cache, so an offline call over
        a long sequence costs O(T·context), not O(T²), and uses the very code streaming does."""
        cache = {} if state is None else state
        offset = cache.get(self, 0)
        T = x.shape[1]
        out = []
        for start in range(0, T, self.context):
            h = x[:, start : start + self.context]
            pos = torch.arange(offset + start, offset + start + h.shape[1], device=x.device)
            for layer in self.layers:
                h = layer(h, pos, cache)
            out.append(h)
        cache[self] = offset + T  # streaming: RoPE positions continue from here
        return torch.cat(out, dim=1) if len(out) != 1 else out[0]


class ConvLayoutTransformer(Streamable):
    """The transformer applied to conv-layout tensors [B, D, T] (Kyutai's ProjectedTransformer with
    no projections: input and model widths are both 512)."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        self.transformer = Transformer(c)

    def forward(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        return self.transformer(x.transpose(1, 2), state).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Split residual vector quantizer


class Codebook(nn.Module):
    """EMA codebook as stored by Kyutai: vectors = embedding_sum / max(cluster_usage, 1e-5)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(size))
        # random (not zero) so that a randomly built codec is usable in tests and benchmarks
        self.register_buffer("embedding_sum", torch.randn(size, dim))

    def table(self) -> torch.Tensor:
        return self.embedding_sum / self.cluster_usage.clamp(min=1e-5)[:, None]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        # gather before dividing: same numbers as table()[codes], without a 2048-row division per call
        return self.embedding_sum[codes] / self.cluster_usage[codes].clamp(min=1e-5)[..., None]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, dim] -> index of the nearest vector (Euclidean; ties to the lowest index)."""
        return torch.cdist(x[None], self.table()[None])[0].argmin(dim=-1)


class _VQ(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self._codebook = Codebook(size, dim)


class ResidualVQ(nn.Module):
    """1x1 projection D -> dim, residual quantization over `n` codebooks, projection back."""

    def __init__(self, dimension: int, dim: int, size: int, n: int):
        super().__init__()
        self.input_proj = nn.Conv1d(dimension, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, dimension, 1, bias=False)
        self.vq = _Holder(layers=nn.ModuleList([_VQ(size, dim) for _ in range(n)]))

    def codebook(self, i: int) -> Codebook:
        return self.vq.layers[i]._codebook

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x [B, D, T] -> codes [B, n, T]."""
        r = self.input_proj(x).transpose(1, 2)  # [B, T, dim]
        B, T, dim = r.shape
        r = r.reshape(B * T, dim)
        codes = []
        for i in range(n):
            book = self.codebook(i)
            c = book.nearest(r)
            r = r - book.lookup(c)
            codes.append(c.view(B, T))
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n, T] -> [B, D, T]."""
        z = sum(self.codebook(i).lookup(codes[:, i]) for i in range(codes.shape[1]))  # [B, T, dim]
        return self.output_proj(z.transpose(1, 2))


class SplitRVQ(nn.Module):
    """Codebook 0 ("semantic") and codebooks 1.. ("acoustic") quantize the same latent separately:
    the acoustic RVQ sees the full latent, not what the semantic codebook left over."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        self.rvq_first = ResidualVQ(c.dimension, c.codebook_dim, c.codebook_size, 1)
        self.rvq_rest = ResidualVQ(c.dimension, c.codebook_dim, c.codebook_size, c.n_q - 1)

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        first = self.rvq_first.encode(x, 1)
        return torch.cat([first, self.rvq_rest.encode(x, n - 1)], dim=1) if n > 1 else first

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.rvq_first.decode(codes[:, :1])
        return z + self.rvq_rest.decode(codes[:, 1:]) if codes.shape[1] > 1 else z


# ---------------------------------------------------------------------------------------------
# The codec

# Older Kyutai checkpoints name a few tensors differently; map them onto the current names.
_ALIASES = {
    "._codebook.cluster_size": "._codebook.cluster_usage",
    "._codebook.embed_avg": "._codebook.embedding_sum",
    "._codebook.inited": "._codebook._initialized",
    ".self_attn.in_projs.0.weight": ".self_attn.in_proj_weight",
    ".self_attn.out_projs.0.weight": ".self_attn.out_proj.weight",
}


def _remap_aliases(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        new = key
        for old, cur in _ALIASES.items():
            if key.endswith(old):
                new = key[: -len(old)] + cur
                break
        if new in out:
            raise InputError(f"Mimi checkpoint holds tensor {new!r} twice (under an old and a new name)")
        out[new] = value
    return out


class Mimi(CodecInterface, nn.Module):
    """Mimi codec. decode(codes [B, K, T]) -> [B, 1920·T]; encode(wave [B, N]) -> [B, K, ceil(N/1920)]."""

    can_encode = True
    offline_chunk_frames = 256  # decode()/encode() longer inputs in chunks of this many frames (~20 s)

    def __init__(self, config: MimiConfig | None = None, num_codebooks: int = 8):
        super().__init__()
        c = self.config = config or MimiConfig()
        self.encoder = SEANetEncoder(c)
        self.encoder_transformer = ConvLayoutTransformer(c)
        self.downsample = _Holder(
            conv=CausalConv1d(c.dimension, c.dimension, 2 * c.resample_stride, c.resample_stride, bias=False, pad_mode="replicate")
        )
        self.quantizer = SplitRVQ(c)
        # depth-wise (one filter per channel) learnt upsampling back to the transformer rate
        self.upsample = _Holder(
            convtr=CausalConvTranspose1d(
                c.dimension, c.dimension, 2 * c.resample_stride, c.resample_stride, groups=c.dimension, bias=False
            )
        )
        self.decoder_transformer = ConvLayoutTransformer(c)
        self.decoder = SEANetDecoder(c)
        self.num_codebooks = num_codebooks

    # -- interface shared by all codecs (sample_rate, frame_samples: CodecInterface) ----------

    @property
    def num_codebooks(self) -> int:
        return self._num_codebooks

    @num_codebooks.setter
    def num_codebooks(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.config.n_q:
            raise InputError(f"Mimi num_codebooks must be an int in [1, {self.config.n_q}], got {n!r}")
        self._num_codebooks = n

    @property
    def device(self) -> torch.device:
        return self.decoder.model[0].conv.conv.weight.device

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] (or [K, T]) ints in [0, 2047] -> audio [B, 1920·T] float32 at 24 kHz.
        A frame starting with the end-of-audio code and everything after it are dropped."""
        codes = self._check_codes(codes)
        n = self.offline_chunk_frames
        if codes.shape[2] <= n:
            return self._decode(codes, None)
        # Long input: same result through the streaming path, with activations bounded by the
        # chunk (full-length SEANet activations of a 5-minute clip would take gigabytes).
        state: State = {}
        return torch.cat([self._decode(codes[:, :, t : t + n], state) for t in range(0, codes.shape[2], n)], dim=1)

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [B, N] or [B, 1, N] float at 24 kHz -> codes [B, K, ceil(N / 1920)] (int64).
        The audio is right-padded with zeros to whole frames."""
        wave = self._check_wave(wave)
        wave = F.pad(wave, (0, -wave.shape[-1] % self.frame_samples))
        n = self.offline_chunk_frames * self.frame_samples
        if wave.shape[-1] <= n:
            return self._encode(wave, None)
        state: State = {}  # long input: chunked through the streaming path, as in decode()
        return torch.cat([self._encode(wave[..., t : t + n], state) for t in range(0, wave.shape[-1], n)], dim=2)

    def stream(self, batch_size: int = 1) -> "MimiDecodeStream":
        """A streaming decoder: feed frames a few at a time, get their audio right away."""
        return MimiDecodeStream(self, batch_size)

    def stream_encoder(self, batch_size: int = 1) -> "MimiEncodeStream":
        """A streaming encoder: feed whole frames of audio (multiples of 1920 samples), get codes."""
        return MimiEncodeStream(self, batch_size)

    # -- internals -----------------------------------------------------------------------------

    def _decode(self, codes: torch.Tensor, state: State | None) -> torch.Tensor:
        B, _, T = codes.shape
        if T == 0:
            return torch.zeros(B, 0, device=self.device)
        x = self.quantizer.decode(codes)  # [B, D, T] at 12.5 Hz
        x = self.upsample.convtr(x, state)  # [B, D, 2T] at 25 Hz
        x = self.decoder_transformer(x, state)
        return self.decoder(x, state)[:, 0]  # [B, 1920·T]

    def _encode(self, wave: torch.Tensor, state: State | None) -> torch.Tensor:
        B = wave.shape[0]
        if wave.shape[-1] == 0:
            return torch.zeros(B, self.num_codebooks, 0, dtype=torch.long, device=self.device)
        x = self.encoder(wave, state)  # [B, D, N/960] at 25 Hz
        x = self.encoder_transformer(x, state)
        x = self.downsample.conv(x, state)  # [B, D, N/1920] at 12.5 Hz
        return self.quantizer.encode(x, self.num_codebooks)

    def _check_wave(self, wave) -> torch.Tensor:
        return check_wave(wave, self.device)

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device="cpu", num_codebooks: int = 8, config: MimiConfig | None = None) -> "Mimi":
        """Load Kyutai's Mimi safetensors (a file, or a directory holding MIMI_FILE), strictly."""
        path = Path(path)
        if path.is_dir():
            path = path / MIMI_FILE
        if not path.is_file():
            raise InputError(f"Mimi checkpoint not found: {path}")
        state_dict = dict(read_tensors(path, list(tensor_shapes(path)), torch.float32, device))
        return cls.from_state_dict(state_dict, device=device, num_codebooks=num_codebooks, config=config, source=str(path))

    @classmethod
    def from_state_dict(
        cls, state_dict: dict, device="cpu", num_codebooks: int = 8, config: MimiConfig | None = None, source="state dict"
    ) -> "Mimi":
        """Build a Mimi from Kyutai-layout tensors. Every tensor must be present with the right
        shape and nothing else may be there: a silently half-loaded codec makes noise, not errors."""
        with empty_modules():  # no memory, no init: every value comes from the checkpoint
            model = cls(config, num_codebooks)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state_dict = _remap_aliases(state_dict)
        check_tensors(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, f"Mimi checkpoint {source}")
        state_dict = {k: v.to(device=device, dtype=torch.float32) for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()


class _Stream:
    """Carried state of one streaming encode or decode, for a fixed batch size."""

    def __init__(self, mimi: Mimi, batch_size: int = 1):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        self.mimi, self.batch_size = mimi, batch_size
        self.reset()

    def reset(self) -> None:
        self.state: State = {}

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.batch_size:
            raise InputError(f"this stream was opened for batch {self.batch_size}, got {x.shape[0]}")


class MimiDecodeStream(_Stream):
    """Streaming decoder: decode(codes [B, K, t]) -> [B, 1920·t]; outputs concatenate to decode()."""

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.mimi._check_codes(codes)
        self._check_batch(codes)
        return self.mimi._decode(codes, self.state)

    def flush(self) -> torch.Tensor:
        """Mimi holds nothing back (every frame's audio is final at once); starts afresh."""
        self.reset()
        return torch.zeros(self.batch_size, 0, device=self.mimi.device)


class MimiEncodeStream(_Stream):
    """Streaming encoder: encode(wave [B, n·1920]) -> codes [B, K, n]; outputs concatenate to encode()."""

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        wave = self.mimi._check_wave(wave)
        self._check_batch(wave)
        if wave.shape[-1] % self.mimi.frame_samples:
            raise InputError(
                f"streaming encode takes whole frames: {wave.shape[-1]} samples is not a multiple of "
                f"{self.mimi.frame_samples}"
            )
        return self.mimi._encode(wave, self.state)

"""A fast decode engine: the plain modules' arithmetic with less work per token.

    engine = FastLFM2Audio(model)                 # or FastLFM2Audio(quantize_model(model))
    conv = Conversation(engine, tokenizer, system=...)
    for event in generate(conv, "interleaved"):   # the unchanged generation loop
        ...

`FastLFM2Audio` stands in for an `LFM2AudioModel` wherever one is expected (it forwards every
other attribute to the wrapped model), so `Conversation` and `generate` run on it unchanged,
and the plain eager path stays available by passing the model itself.

Decoding one token at batch size 1 reads every weight once for one activation row: the time is
weight bytes over memory bandwidth plus per-op overhead. What the engine does about both:

* Weights are gathered once at construction: q/k/v and w1/w3 are concatenated into one matrix
  each (fewer, larger GEMVs), every per-head norm weight is laid out for q and k together, and
  the depthformer's per-codebook embedding, norm and logit weights are held in plain lists.
  On CPU the float matrices are prepacked into oneDNN's blocked layout, which makes the GEMV
  about 1.3-1.5x faster (in bf16 with bit-identical results to `F.linear`). Where oneDNN
  cannot prepack bf16 (no bf16 arithmetic), one to four rows go to the hand-written AVX2 GEMV
  of model/cpu_kernels.py instead, and so do int8 weights (model/quantize.py) on any AVX2 CPU.
* The backbone's RoPE cos/sin come from a table built once (no inv_freq / cos / sin per step);
  rows that all have the same length attend without a mask.
* The 8 codebook steps of a frame are one routine over a preallocated depth KV cache (8 slots)
  and cos/sin tables for the 8 positions; sampling stays on the device.
* On a CPU without bf16 arithmetic (no AVX-512 or AVX-NE-CONVERT: oneDNN cannot prepack
  there), torch's bf16 matmul falls back to a path ~3x slower than fp32 for many rows. There,
  matmuls of 5-192 rows (prefill, serving batches) run cpu_kernels' GEMM, which widens the
  weight a few rows at a time (more rows, or where the kernels cannot build: 16+ rows
  convert the whole weight into a reused fp32 buffer for oneDNN), the audio encoder runs an
  fp32 copy of itself (a few hundred MB at official size), and the short conv runs as
  elementwise taps: on a 2-core AVX2 CPU at official size the prefill of a 4 s prompt drops
  from 10.3 s to 1.7-2.1 s.
* Tiny ops that would open a parallel region (the depth attention over <= 8 keys, the 3-tap
  conv of a decode step) are written as elementwise math that stays on one thread: with the
  cores busy (a shared machine), every parallel region can cost a scheduler time slice.

Everything else keeps the plain path's floating-point operations (same ops, same order, same
dtypes). With `exact=True` the small ops are the plain ones too and the fast path reproduces
the plain path bit for bit in bf16 and fp32; by default the depth attention (and in fp32 the
conv step and the oneDNN GEMV, which sums in another order than MKL) differ from it by
rounding only, ~1e-6 relative in fp32 (the tests check tokens and logits both ways).

Memory: prepacked weights are a second copy of the decode weights (the wrapped model keeps its
own for the plain path); an int8 model (`quantize_model`) is used in place, no copy.

GPU: on CUDA the backbone steps (decode and prefill chunks), the frame and the audio encoder
are replayed from CUDA graphs (cuda_graphs.py), optionally after torch.compile; whatever the
graphs do not cover runs the routines here.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DEPTH_HEADS, DEPTH_KV_HEADS, DEPTH_ROPE_THETA, END_OF_AUDIO
from ..model.lfm2 import rope_inv_freq
from ..model.lfm2_audio import run_encoder
from ..model import cpu_kernels
from ..model.quantize import (HALF, Int4Linear, Int8Linear, converted_linear, int4_linear, int8_dynamic_linear, int8_linear,
                              matmul_dtype, native_half, use_cpu_gemm)
from .sampling import GREEDY, Sampling, sample


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_all_cores() -> int:
    """Run torch's intra-op pool on every core this process may use (decode is bandwidth-bound,
    and one core alone cannot saturate memory)."""
    n = usable_cores()
    torch.set_num_threads(n)
    return n


def can_prepack(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can reorder weights of `dtype` on this CPU (its bf16 and fp16 paths need
    AVX-512 or AVX-NE-CONVERT, which many CPUs lack)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return dtype not in HALF or native_half(dtype)


# ---- weights ----------------------------------------------------------------------------------


class FusedLinear:
    """One matmul over the row-concatenation of several linears' weights (same input).

    Float weights are either used as they are (a single linear: no copy) or concatenated; with
    `prepack` they are reordered into oneDNN's layout for CPU GEMV. Int8Linear weights are
    concatenated with their scales and go to `int8_linear`, Int4Linear ones (packed rows,
    scales and zeros) to `int4_linear`. To keep one copy of the weights in
    memory, concatenated (unpacked) weights are written back into the modules as views.
    Unless `exact`, many rows of a bf16/fp16 matmul on a CPU without half arithmetic run in fp32
    (quantize.matmul_dtype): prefill there is ~3x faster.
    """

    def __init__(self, modules: list[nn.Module], prepack: bool, exact: bool = False):
        self.exact = exact
        biases = [m.bias for m in modules]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        kinds = {"int8" if isinstance(m, Int8Linear) else "int4" if isinstance(m, Int4Linear) else None for m in modules}
        if len(kinds) > 1:
            raise ValueError(f"cannot fuse linears of different kinds: {kinds}")
        self.quantized = kinds.pop()  # None, "int8" or "int4"
        self._packed = None
        self._bf16_kernel = False
        if self.quantized == "int4":
            self.weight = _concat_into(modules, "weight")  # the kernel's packed rows
            self.sz = torch.cat([m.scales_and_zeros for m in modules], dim=1)
            self.bytes = self.weight.numel() + self.sz.numel() * self.sz.element_size()
            self._sz = {}  # scales and zeros in each activation dtype
            return
        if self.quantized:
            self.dynamic = modules[0].dynamic
            self.weight = _concat_into(modules, "weight")
            self.scales = torch.cat([m.scales for m in modules])
            self.bytes = self.weight.numel() + self.scales.numel() * self.scales.element_size()
            self._scales32 = self.scales.float()  # for cpu_kernels's int8 kernels
            self._scales127 = self.scales.float() / 127.0  # for the dynamic (int8 x int8) kernel
            return
        self.weight = _concat_into(modules, "weight", rewrite=not prepack)
        self.bytes = self.weight.numel() * self.weight.element_size()
        # One-row bf16 products where oneDNN cannot prepack go to cpu_kernels (decoding's bulk).
        self._bf16_kernel = (not prepack and not exact and self.weight.dtype == torch.bfloat16
                             and self.weight.device.type == "cpu" and self.weight.is_contiguous())
        if prepack:
            # batch_size=1: the layout for GEMV; other row counts (prefill) still work.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)
            self.weight = None  # the modules keep theirs; the engine only needs the packed one

    def kernel_struct(self):
        """This weight as cpu_kernels sees it, or None where those kernels do not take it."""
        if (self.bias is not None or self.weight is None or self.weight.device.type != "cpu"
                or cpu_kernels.library() is None):
            return None
        if self.quantized == "int8" and not self.dynamic:
            return cpu_kernels.linear_struct(self.weight, self._scales32)
        return cpu_kernels.linear_struct(self.weight) if self._bf16_kernel else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] (2-D: callers flatten) -> [rows, out]."""
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if self.quantized == "int4":
            sz = self._sz.get(x.dtype)
            if sz is None:
                sz = self._sz[x.dtype] = self.sz.to(x.dtype)
            return int4_linear(x, self.weight, sz, self.bias)
        if self.quantized:
            if self.dynamic:
                return int8_dynamic_linear(x, self.weight, self._scales127, self.bias)
            return int8_linear(x, self.weight, self.scales, self.bias, scales32=self._scales32)
        if self._bf16_kernel and cpu_kernels.usable(x, self.bias):
            return cpu_kernels.bf16_linear(x.contiguous(), self.weight, self.bias)
        if self._bf16_kernel and use_cpu_gemm(x, self.bias):
            return cpu_kernels.gemm(x, self.weight, bias=self.bias)
        if not self.exact and matmul_dtype(x) != x.dtype:
            return converted_linear(x, self.weight, bias=self.bias)
        return F.linear(x, self.weight, self.bias)


def _concat_into(modules, name: str, rewrite: bool = True) -> torch.Tensor:
    parts = [getattr(m, name).detach() for m in modules]
    if len(parts) == 1:
        return parts[0]
    whole = torch.cat(parts)
    if rewrite:  # let the modules see slices of the one copy, so memory is not doubled
        start = 0
        for m, p in zip(modules, parts):
            view = whole[start : start + p.shape[0]]
            if isinstance(getattr(m, name), nn.Parameter):
                setattr(m, name, nn.Parameter(view, requires_grad=False))
            else:
                setattr(m, name, view)
            start += p.shape[0]
    return whole


def _rms_hf(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Backbone RMSNorm: normalise in fp32, cast back, scale in the input dtype."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _rms_liquid(x: torch.Tensor, weight32: torch.Tensor, eps: float) -> torch.Tensor:
    """Depthformer RMSNorm: the weight multiply happens in fp32, then cast back."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight32, eps).to(x.dtype)


# ---- backbone ----------------------------------------------------------------------------------


class _BackboneLayer:
    def __init__(self, layer, prepack: bool, exact: bool):
        self.attention = layer.is_attention
        self.op_norm = layer.operator_norm.weight.detach()
        self.ffn_norm = layer.ffn_norm.weight.detach()
        self.eps = layer.operator_norm.eps
        ff = layer.feed_forward
        self.w13 = FusedLinear([ff.w1, ff.w3], prepack, exact)
        self.w2 = FusedLinear([ff.w2], prepack, exact)
        self.ffn_dim = ff.w1.weight.shape[0]
        if self.attention:
            a = layer.self_attn
            self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.n_kv, a.head_dim
            self.qkv = FusedLinear([a.q_proj, a.k_proj, a.v_proj], prepack, exact)
            self.out = FusedLinear([a.out_proj], prepack, exact)
            # q and k heads are normalised in one call: a [q heads + kv heads, head_dim] weight.
            self.qk_norm = torch.cat([a.q_layernorm.weight.detach().expand(a.n_heads, -1),
                                      a.k_layernorm.weight.detach().expand(a.n_kv, -1)])
            self.qk_eps = a.q_layernorm.eps
        else:
            c = layer.conv
            self.in_proj = FusedLinear([c.in_proj], prepack, exact)
            self.out = FusedLinear([c.out_proj], prepack, exact)
            self.conv_weight = c.conv.weight.detach()
            self.conv_bias = None if c.conv.bias is None else c.conv.bias.detach()
            # Taps [kernel, D] in fp32 for the decode step's elementwise conv (see _conv).
            same_sums = self.conv_weight.dtype in (torch.bfloat16, torch.float16) and self.conv_bias is None
            use_taps = self.conv_bias is None and (same_sums or not exact)
            self.conv_taps = self.conv_weight[:, 0].float().T.contiguous() if use_taps else None

    @property
    def bytes(self) -> int:
        linears = [self.w13, self.w2, self.out] + ([self.qkv] if self.attention else [self.in_proj])
        return sum(lin.bytes for lin in linears)


class FastBackbone:
    """Decode steps and prefill chunks over an `Lfm2Cache`, rows at the same or at different
    positions; anything else (no cache, sliding window) goes to the plain module, so results
    never depend on which path ran."""

    ROPE_CHUNK = 4096  # the cos/sin table grows by this many positions when needed

    def __init__(self, lfm, prepack: bool, exact: bool = False):
        self.base = lfm
        self.cfg = lfm.cfg
        self.layers = [_BackboneLayer(layer, prepack, exact) for layer in lfm.layers]
        self.final_norm = lfm.embedding_norm.weight.detach()
        self.eps = lfm.embedding_norm.eps
        self._cos = self._sin = None
        self.cpu_step = None if exact else self._cpu_step()

    def _cpu_step(self):
        """The one-position step as one cpu_kernels call, where every weight goes to those kernels."""
        cfg, first = self.cfg, self.layers[0]
        if self.final_norm.dtype != torch.bfloat16 or cfg.head_dim % 8 or cfg.conv_L_cache < 2:
            return None
        layers = []
        for layer in self.layers:
            names = ("qkv" if layer.attention else "in_proj", "out", "w13", "w2")
            structs = [getattr(layer, name).kernel_struct() for name in names]
            if (None in structs or layer.eps != first.eps or layer.op_norm.dtype != torch.bfloat16
                    or (not layer.attention and layer.conv_taps is None)):
                return None
            entry = dict(zip(("in", "out", "w13", "w2"), structs), attention=layer.attention,
                         operator_norm=layer.op_norm.contiguous(), ffn_norm=layer.ffn_norm.contiguous())
            if layer.attention:
                entry["qk_norm"] = layer.qk_norm.contiguous()
            else:
                entry["conv_taps"] = layer.conv_taps
            layers.append(entry)
        qk_eps = {layer.qk_eps for layer in self.layers if layer.attention}
        if len(qk_eps) > 1:
            return None
        return cpu_kernels.BackboneStep(
            layers, self.final_norm.contiguous(), heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, ffn_dim=first.ffn_dim, conv_len=cfg.conv_L_cache, eps=first.eps,
            qk_eps=qk_eps.pop() if qk_eps else 0.0, keep=[self.layers])

    # Attributes Conversation / generate use on `model.lfm`.
    @property
    def embed_tokens(self):
        return self.base.embed_tokens

    def new_cache(self, *args, **kwargs):
        return self.base.new_cache(*args, **kwargs)

    @property
    def bytes_per_step(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    def rope(self, start: int, n: int, dtype, device):
        """cos, sin [n, head_dim] for positions start..start+n-1, from a table computed once
        with the plain path's formula (bf16-rounded inv_freq, fp32 angles, cast to dtype)."""
        end = start + n
        if self._cos is None or self._cos.shape[0] < end or self._cos.dtype != dtype or self._cos.device != device:
            size = -(-end // self.ROPE_CHUNK) * self.ROPE_CHUNK
            inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, dtype).to(device)
            freqs = torch.arange(size, device=device).float()[:, None] * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return self._cos[start:end], self._sin[start:end]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, cache=None, window: int | None = None) -> torch.Tensor:
        if cache is None or window is not None:
            return self.base(x, cache, window)
        return self.forward(x, cache)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        """x [B, S, D] new positions; each row continues its own history (cache.lengths)."""
        B, S, D = x.shape
        start = cache.max_len
        end = start + S
        if end > cache.capacity:
            raise RuntimeError(f"cache holds {cache.capacity} positions, {end} needed")
        if S == 1 and self.cpu_step is not None and _uniform(cache) and cpu_kernels.usable(x[:, 0]):
            state = self.cpu_step.state(cache)
            if state is not None:
                cos, sin = self.rope(start, 1, x.dtype, x.device)
                out = self.cpu_step(x[:, 0], state, cos[0], sin[0], start, min(cache.capacity, 2**31 - 1))
                cache.lengths += 1
                cache.max_len = end
                return out.view(B, 1, D)
        if _uniform(cache):
            cos, sin = self.rope(start, S, x.dtype, x.device)  # [S, hd]
            # A single new position sees everything before it; a chunk after history needs the
            # causal mask shifted by the history length; a chunk from position 0 is plain causal.
            mask = None
            if S > 1 and start > 0:
                mask = (torch.arange(S, device=x.device)[:, None] + start) >= torch.arange(end, device=x.device)
            slots = slice(start, end)
        else:
            # Rows at different positions (the serving engine's batch): per-row rotary angles,
            # cache slots and masks over the keys up to the longest row, as the plain path.
            positions = cache.lengths[:, None] + torch.arange(S, device=x.device)  # [B, S]
            table_cos, table_sin = self.rope(0, end, x.dtype, x.device)
            cos, sin = table_cos[positions][:, None], table_sin[positions][:, None]  # [B, 1, S, hd]
            mask = (positions[:, :, None] >= torch.arange(end, device=x.device))[:, None]
            slots = (torch.arange(B, device=x.device)[:, None], positions)
        x = x.reshape(B * S, D)  # rows x features for every matmul and norm
        conv_i = attn_i = 0
        for layer in self.layers:
            h = _rms_hf(x, layer.op_norm, layer.eps)
            if layer.attention:
                h = self._attention(layer, h, B, S, cos, sin, cache.keys[attn_i], cache.values[attn_i], slots, end, mask)
                attn_i += 1
            else:
                h = self._conv(layer, h, B, S, cache.conv[conv_i])
                conv_i += 1
            x = x + h
            a, b = layer.w13(_rms_hf(x, layer.ffn_norm, layer.eps)).split(layer.ffn_dim, dim=-1)
            x = x + layer.w2(F.silu(a) * b)
        cache.lengths += S
        cache.max_len = end
        return _rms_hf(x, self.final_norm, self.eps).view(B, S, D)

    @staticmethod
    def _attention(layer, h, B, S, cos, sin, k_cache, v_cache, slots, end, mask):
        H, KV, hd = layer.n_heads, layer.n_kv, layer.head_dim
        qkv = layer.qkv(h)
        qk = qkv[:, : (H + KV) * hd].view(B, S, H + KV, hd)
        qk = layer.qk_norm * F.rms_norm(qk.float(), (hd,), None, layer.qk_eps).to(h.dtype)
        qk = qk.transpose(1, 2)  # [B, H + KV, S, hd]
        x1, x2 = qk.chunk(2, dim=-1)
        qk = qk * cos + torch.cat((-x2, x1), dim=-1) * sin  # rotate-half RoPE
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + KV) * hd :].view(B, S, KV, hd).transpose(1, 2)
        if isinstance(slots, slice):  # every row at the same positions
            k_cache[:, :, slots] = k
            v_cache[:, :, slots] = v
        else:  # (rows [B, 1], positions [B, S])
            k_cache[slots[0], :, slots[1]] = k.transpose(1, 2)
            v_cache[slots[0], :, slots[1]] = v.transpose(1, 2)
        k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and S > 1, enable_gqa=True)
        return layer.out(out.transpose(1, 2).reshape(B * S, H * hd))

    @staticmethod
    def _conv(layer, h, B, S, state):
        b_gate, c_gate, xv = layer.in_proj(h).view(B, S, -1).transpose(1, 2).chunk(3, dim=1)
        u = torch.cat((state, b_gate * xv), dim=2)  # [B, D, history + S]
        state.copy_(u[:, :, -state.shape[2] :])
        if layer.conv_taps is not None and (S == 1 or u.device.type == "cpu"):
            # The taps as elementwise math over shifted views, summed in fp32 in the conv
            # kernel's order: with bf16 inputs the products are exact in fp32, so this is
            # bit-identical to the conv. It avoids the conv op's costs: a parallel region for
            # 2048 x 3 multiply-adds per decode step, and in prefill torch's bf16 fallback on
            # CPUs without bf16 arithmetic (one small conv per channel, ~20-40 ms a layer).
            u32, taps = u.float(), layer.conv_taps[:, :, None]
            v = u32[:, :, :S] * taps[0]
            for i in range(1, taps.shape[0]):
                v = v + u32[:, :, i : i + S] * taps[i]
            v = v.to(u.dtype)
        else:
            v = F.conv1d(u, layer.conv_weight, layer.conv_bias, groups=u.shape[1])
        return layer.out((c_gate * v).transpose(1, 2).reshape(B * S, -1))


def _uniform(cache) -> bool:
    """Whether every row has seen cache.max_len positions (checked on the host; free on CPU, a
    sync on GPU where a host-side mirror of the lengths should replace it)."""
    n = cache.lengths.shape[0]
    return n == 1 or bool((cache.lengths == cache.max_len).all())


# ---- depthformer -------------------------------------------------------------------------------


def depth_attention_sdpa(q, k, v):
    """q [B, H, hd], k/v [B, KV, t, hd] -> [B, H * hd]: the plain path's SDPA call."""
    B, H, hd = q.shape
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True).view(B, H * hd)


def depth_attention_small(q, k, v):
    """The same attention as elementwise fp32 math over the <= 8 keys (k, v kept in fp32).

    SDPA opens a parallel region for 32 one-row dot products; on a busy machine (a thread
    descheduled) that has cost milliseconds per call, 48 calls a frame. Here every op is far
    below the size that goes parallel. Agrees with SDPA to rounding, not bit for bit.
    """
    B, H, hd = q.shape
    KV = k.shape[1]
    scores = (q.view(B, KV, H // KV, 1, hd).float() * k[:, :, None]).sum(-1)  # [B, KV, group, t]
    p = (scores * hd**-0.5).softmax(-1)
    return (p[..., None] * v[:, :, None]).sum(-2).view(B, H * hd).to(q.dtype)


class _DepthLayer:
    def __init__(self, block, prepack: bool, exact: bool):
        att = block.operator
        self.op_norm = block.operator_norm.weight.detach().float()
        self.ffn_norm = block.ffn_norm.weight.detach().float()
        self.eps = block.operator_norm.eps
        self.qkv = FusedLinear([att.qkv_proj], prepack, exact)
        self.out = FusedLinear([att.out_proj], prepack, exact)
        self.w13 = FusedLinear([block.feed_forward.w1, block.feed_forward.w3], prepack, exact)
        self.w2 = FusedLinear([block.feed_forward.w2], prepack, exact)
        self.ffn_dim = block.feed_forward.w1.weight.shape[0]
        n = att.bounded_attention
        self.qk_norm = torch.cat([n.q_layernorm.weight.detach().float().expand(DEPTH_HEADS, -1),
                                  n.k_layernorm.weight.detach().float().expand(DEPTH_KV_HEADS, -1)])
        self.qk_eps = n.q_layernorm.eps

    @property
    def bytes(self) -> int:
        return sum(lin.bytes for lin in (self.qkv, self.out, self.w13, self.w2))


class FastDepth:
    """One audio frame: depth_linear, then the 8 codebook steps over preallocated buffers."""

    def __init__(self, model, prepack: bool, exact: bool = False):
        cfg = model.cfg
        self.attend = depth_attention_sdpa if exact else depth_attention_small
        self.exact = exact
        self.K, self.dim = cfg.codebooks, cfg.depthformer.dim
        self.head_dim = cfg.depthformer.head_dim
        self.depth_linear = FusedLinear([model.depth_linear], prepack, exact)
        self.layers = [_DepthLayer(b, prepack, exact) for b in model.depthformer.layers]
        # Per codebook: the table that embeds its code for the next slot, and its output head.
        self.embed = [e.embedding.weight.detach() for e in model.depth_embeddings]
        self.head_norm = [e.embedding_norm.weight.detach().float() for e in model.depth_embeddings]
        self.head_eps = model.depth_embeddings[0].embedding_norm.eps
        self.heads = [FusedLinear([_AsLinear(e.logits_weight())], prepack, exact) for e in model.depth_embeddings]
        # Interleaved-pair RoPE for the K slot positions, as x * cos2 + swap_pairs(x) * sin2:
        # the same products and sums as the plain (xr cos - xi sin, xr sin + xi cos).
        hd = self.head_dim
        freqs = DEPTH_ROPE_THETA ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        angle = torch.arange(self.K, dtype=torch.float32)[:, None] * freqs  # [K, hd/2]
        device = model.device
        self.cos2 = angle.cos().repeat_interleave(2, dim=-1).to(device)  # [K, hd]
        self.sin2 = torch.stack((-angle.sin(), angle.sin()), dim=-1).flatten(-2).to(device)
        self._kv = None  # per layer (K, V) [B, kv heads, K slots, hd], reused across frames
        self.cpu_step = None if exact else self._cpu_step()

    def _cpu_step(self):
        """The codebook step as one cpu_kernels call, where every weight goes to those kernels."""
        layers = []
        for layer in self.layers:
            structs = {name: getattr(layer, name).kernel_struct() for name in ("qkv", "out", "w13", "w2")}
            if None in structs.values() or layer.eps != self.layers[0].eps or layer.qk_eps != self.layers[0].qk_eps:
                return None
            layers.append(dict(structs, operator_norm=layer.op_norm.contiguous(), ffn_norm=layer.ffn_norm.contiguous(),
                               qk_norm=layer.qk_norm.contiguous()))
        heads = [h.kernel_struct() for h in self.heads]
        if None in heads or not layers:
            return None
        first = self.layers[0]
        return cpu_kernels.DepthStep(
            layers, heads, [n.contiguous() for n in self.head_norm], self.cos2.contiguous(), self.sin2.contiguous(),
            heads_q=DEPTH_HEADS, kv_heads=DEPTH_KV_HEADS, ffn_dim=first.ffn_dim, eps=first.eps, qk_eps=first.qk_eps,
            head_eps=self.head_eps, keep=[self.layers, self.heads])

    @property
    def bytes_per_frame(self) -> int:
        per_step = sum(layer.bytes for layer in self.layers)
        return self.depth_linear.bytes + self.K * per_step + sum(h.bytes for h in self.heads)

    def _caches(self, B, dtype, device):
        if not self.exact:
            dtype = torch.float32  # depth_attention_small works in fp32; values stay dtype-rounded
        kv = self._kv
        if kv is None or kv[0][0].shape[0] != B or kv[0][0].dtype != dtype or kv[0][0].device != device:
            shape = (B, DEPTH_KV_HEADS, self.K, self.head_dim)
            self._kv = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                        for _ in self.layers]
        return self._kv

    @torch.inference_mode()
    def frame(self, h: torch.Tensor, params: Sampling = GREEDY, generator=None, return_logits: bool = False):
        """Backbone states [B, D] -> codes [B, K] (and logits [B, K, 2049]); the plain
        `LFM2AudioModel.sample_frame` contract: codebooks 1.. never emit end-of-audio."""
        B = h.shape[0]
        z = self.depth_linear(h).view(B, self.K, self.dim)
        kv = self._caches(B, z.dtype, z.device)
        in_c = self.cpu_step is not None and cpu_kernels.usable(z[:, 0])
        step = self.cpu_step if in_c else self._codebook_step
        x = z[:, 0].clone() if in_c else z[:, 0]  # the C step overwrites its input
        codes, all_logits = [], []
        for k in range(self.K):
            logits = step(k, x, kv)
            if return_logits:
                all_logits.append(logits)
                logits = logits.clone()
            if k > 0:
                logits[:, END_OF_AUDIO] = float("-inf")
            code = sample(logits, params, generator)
            codes.append(code)
            if k + 1 < self.K:
                x = z[:, k + 1] + F.embedding(code, self.embed[k])
        frame = torch.stack(codes, dim=1)
        return (frame, torch.stack(all_logits, dim=1)) if return_logits else frame

    def _codebook_step(self, k: int, x: torch.Tensor, kv) -> torch.Tensor:
        """Slot k's input [B, dim] through every layer (its keys and values into the caches),
        then codebook k's head: its logits [B, 2049]."""
        B, H, KV, hd = x.shape[0], DEPTH_HEADS, DEPTH_KV_HEADS, self.head_dim
        cos, sin = self.cos2[k], self.sin2[k]
        for layer, (k_cache, v_cache) in zip(self.layers, kv):
            qkv = layer.qkv(_rms_liquid(x, layer.op_norm, layer.eps))
            qk = qkv[:, : (H + KV) * hd].view(B, H + KV, hd)
            qk = (F.rms_norm(qk.float(), (hd,), None, layer.qk_eps) * layer.qk_norm).to(x.dtype).float()
            swapped = qk.view(B, H + KV, hd // 2, 2).flip(-1).view(B, H + KV, hd)
            qk = (qk * cos + swapped * sin).to(x.dtype)
            k_cache[:, :, k] = qk[:, H:]
            v_cache[:, :, k] = qkv[:, (H + KV) * hd :].view(B, KV, hd)
            att = self.attend(qk[:, :H], k_cache[:, :, : k + 1], v_cache[:, :, : k + 1])
            x = x + layer.out(att)
            a, b = layer.w13(_rms_liquid(x, layer.ffn_norm, layer.eps)).split(layer.ffn_dim, dim=-1)
            x = x + layer.w2(F.silu(a) * b)
        return self.heads[k](_rms_liquid(x, self.head_norm[k], self.head_eps))


class _AsLinear:
    """A bare weight matrix seen as a bias-free linear (the tied depth heads)."""

    def __init__(self, weight):
        self.weight, self.bias = weight, None


# ---- the model stand-in -----------------------------------------------------------------------


class FastLFM2Audio:
    """An LFM2AudioModel with fast decoding; pass it wherever the model goes.

    prepack: reorder float weights for oneDNN (CPU), ~1.3-1.5x faster GEMV. None = on, except
    fp32 with exact=True (in fp32 oneDNN and MKL round differently; in bf16 they agree bit for
    bit). Prepacked weights are a second copy of the decode weights (the wrapped model keeps
    its own for the plain path).
    exact: use the plain path's SDPA / conv ops for the depth attention and the fp32 decode
    conv, so every output is bit-identical to the plain path; the default computes those few
    small ops as elementwise fp32 math instead (same tokens, logits equal to rounding).
    threads: intra-op threads; None = every core this process may use, 0 = leave as set.
    cuda_graphs: replay the backbone steps, the audio frame and the audio encoder from CUDA
    graphs (cuda_graphs.py). None = on for a CUDA model unless exact (graphs round like the
    default engine); True off CUDA runs the same static-buffer code eagerly (how CPU tests
    check it).
    compile: torch.compile the graph path's step functions before capture (fuses the small
    ops, ~2x faster frames; the first call of each shape class compiles, ~40 s in all cold).
    triton: run the graph path's one-row decode steps and audio frames through fused Triton
    kernels (fused.py). None = where the model is on CUDA and Triton imports; True off CUDA
    needs TRITON_INTERPRET=1 (the CPU tests).
    """

    def __init__(self, model, prepack: bool | None = None, exact: bool = False, threads: int | None = None,
                 cuda_graphs: bool | None = None, compile: bool = False, triton: bool | None = None):
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda" and not exact
        elif cuda_graphs and exact:
            raise ValueError("exact=True reproduces the plain path bit for bit; the CUDA graph path does not")
        if cuda_graphs:
            prepack = False  # the graphs call F.linear on the weights themselves
        if threads is None:
            use_all_cores()
        elif threads > 0:
            torch.set_num_threads(threads)
        if prepack is None:  # in fp32 oneDNN sums in another order than MKL: not with exact
            prepack = not exact or model.dtype in HALF
        prepack = prepack and can_prepack(model.device, model.dtype)
        self.model = model
        self.prepack = prepack
        with torch.no_grad():
            self.lfm = FastBackbone(model.lfm, prepack, exact)
            self.depth = FastDepth(model, prepack, exact)
            head = getattr(model.lfm, "text_head", None)
            head = head if head is not None else _AsLinear(model.lfm.embed_tokens.weight)
            self.text_head = FusedLinear([head], prepack, exact)
        self.cuda_graphs = False
        self.encoder = None
        self._encoder32 = None  # (conformer, adapter) in fp32 where the CPU has no bf16 arithmetic
        if not exact and model.device.type == "cpu" and model.dtype in HALF and not native_half(model.dtype):
            # torch's fallback for half-precision convolutions and matmuls is slow there, and the
            # encoder is small: an fp32 copy encodes a 4 s clip ~7x faster (official size, 2-core AVX2)
            self._encoder32 = tuple(copy.deepcopy(m).float() for m in (model.conformer, model.audio_adapter))
        if cuda_graphs:
            from . import cuda_graphs as cg

            reason = cg.unsupported(self)
            if reason is not None:
                warnings.warn(f"CUDA graphs off: the graph path does not handle {reason}", stacklevel=2)
            else:
                kernels = cg.Kernels(compile)
                fused = cg.fused_kernels(model.device, triton)
                self.lfm = cg.GraphBackbone(self.lfm, kernels, fused)
                self.depth = cg.GraphDepth(self.depth, kernels, fused)
                self.encoder = cg.GraphEncoder(model)
                self.cuda_graphs = True

    def __getattr__(self, name):
        # Everything not overridden (cfg, dtype, device, encode_audio, embed_audio_frames, ...)
        # is the wrapped model's.
        model = self.__dict__.get("model")
        if model is None:  # during copy/unpickling, before __init__ ran
            raise AttributeError(name)
        return getattr(model, name)

    def encode_audio(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.encoder is not None:
            return self.encoder(features)
        if self._encoder32 is not None and features:
            return run_encoder(*self._encoder32, features, torch.float32, self.model.device).to(self.model.dtype)
        return self.model.encode_audio(features)

    @torch.inference_mode()
    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] -> [..., vocab] (generate passes a single state [D])."""
        y = self.text_head(h.reshape(-1, h.shape[-1]))
        return y.view(*h.shape[:-1], y.shape[-1])

    def sample_frame(self, h, params: Sampling = GREEDY, generator=None, return_logits: bool = False):
        return self.depth.frame(h, params, generator, return_logits)

    def bytes_per_frame(self) -> int:
        """Weight bytes one audio frame reads: a backbone step and the depthformer frame."""
        return self.lfm.bytes_per_step + self.depth.bytes_per_frame

    def bytes_per_text_token(self) -> int:
        return self.lfm.bytes_per_step + self.text_head.bytes

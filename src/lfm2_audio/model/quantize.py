"""Int8 and int4 weights for the decode-time matmuls (backbone, depthformer, depth_linear, text head).

Decoding one token reads every weight once for a single activation row, so its speed is the
weight bytes over memory bandwidth: int8 halves the bytes of bf16. Weights are stored as int8
with one symmetric scale per output channel (row). Two ways to multiply (`quantize=`):

  "int8"      weight-only: activations stay in the model's dtype, the only error is the weight
              rounding. Kernels (CPU): for one to four bf16 rows the hand-written AVX2 loop
              of cpu_kernels.py (about twice the speed of torch's `aten._weight_int8pack_mm`
              on a 2-core AVX2 CPU; that kernel is the fallback where cpu_kernels cannot build);
              for more bf16 rows (prefill, batches) on a CPU without bf16 arithmetic,
              cpu_kernels' GEMM (the int8 values widened a few rows at a time); elsewhere,
              for many rows convert the int8 values to the activation dtype and run the
              dense GEMM, which is compute-bound there and ~3x faster than the GEMV kernel; fp32
              activations always convert (the int8 kernel's fp32 path is ~20x
              slower than bf16), so int8 is meant for bf16 models.
  "int8-dyn"  dynamic activation quantization: each activation row is also rounded to int8
              (symmetric, its own scale) and `torch._int_mm` multiplies int8 x int8 into
              int32 with VNNI, about 1.5x the GEMV speed of the weight-only kernel per core.
              Costs a few small ops per matmul and adds the activation rounding error, which
              grows with outlier channels: check quality on the real checkpoint.

The conformer and adapter run once per input clip (compute-bound prefill), and the audio and
depth embedding tables are only gathered from, so they stay as they are. The text head
(`h @ embed_tokens.T`, 65536 x 2048) gets its own int8 copy: input lookups keep the exact
table and the model's dtype.

"int4" stores 4-bit codes with a bf16 scale and offset per group of INT4_GROUP input columns
(asymmetric), weight-only: a quarter of the bf16 bytes, multiplied by
`aten._weight_int4pack_mm_for_cpu` (CPU only). On 2 cores one activation row runs ~2.7x the
bf16 GEMV's speed per weight matrix; for many rows (prefill) the kernel is compute-bound, ~2x
slower than the dense bf16 GEMM.

A quantized model is for inference: its state dict holds int8 (or packed int4) weights and
their scales, which `save_pretrained` would write as-is; keep the original checkpoint.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QUANT_MODES
from ..errors import InputError
from . import cpu_kernels

# Above this many activation rows the int8 GEMV kernel loses to dequantize + dense GEMM.
INT8_GEMV_MAX_ROWS = 4
INT4_GROUP = 32  # input columns sharing one scale and offset


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16, chunk: int = 4096):
    """[N, K] float weight -> (int8 [N, K], scales [N] in scale_dtype), symmetric per row.

    The scale is rounded to the dtype the kernel takes *before* quantizing, so the stored pair
    dequantizes to exactly what the kernel computes with (no hidden scale-rounding error).
    Rows are processed in chunks to keep the fp32 temporaries small for the 65536-row head.
    """
    N = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(N, dtype=scale_dtype, device=w.device)
    for i in range(0, N, chunk):
        rows = w[i : i + chunk].float()
        s = (rows.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(scale_dtype)
        scales[i : i + chunk] = s
        # A scale rounded down can push the largest entry just past 127: clamp (error < 1 step).
        q[i : i + chunk] = (rows / s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


QUANT_GEMM_ROWS = 8192  # weight rows converted at a time by the many-rows path
_local = threading.local()  # one conversion buffer per thread


def _scratch(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
        buf = _local.buffer = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def use_int8_gemv(x2: torch.Tensor) -> bool:
    """Whether `aten._weight_int8pack_mm` is the kernel for these activation rows."""
    return x2.device.type == "cpu" and x2.dtype == torch.bfloat16 and x2.shape[0] <= INT8_GEMV_MAX_ROWS


# From this many activation rows a CPU without bf16/fp16 arithmetic runs a matmul faster by
# converting the weight to fp32 first; below it the half-precision GEMV reads fewer bytes. On a
# 2-core AVX2 EPYC, a 16384 x 2048 bf16 weight (conversion + oneDNN fp32): about even at 8 rows,
# 1.7x faster at 16, 4x at 60.
WIDE_ROWS = 16
HALF = (torch.bfloat16, torch.float16)


@functools.cache
def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU has bf16 (fp16) matmul arithmetic: AVX-512 or AVX-NE-CONVERT, by oneDNN."""
    ops = torch.ops.mkldnn
    check = ops._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else ops._is_mkldnn_fp16_supported
    return bool(torch.backends.mkldnn.is_available() and check())


def matmul_dtype(x2: torch.Tensor) -> torch.dtype:
    """The dtype a CPU matmul over x2's rows runs fastest in: fp32 for many bf16/fp16 rows on a
    CPU without half arithmetic (torch's fallback there is ~3x slower than converting the weight
    and running fp32), else x2's own."""
    if (x2.device.type == "cpu" and x2.dtype in HALF and x2.shape[0] >= WIDE_ROWS
            and not native_half(x2.dtype)):
        return torch.float32
    return x2.dtype


def use_cpu_gemm(x2: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether cpu_kernels' GEMM is the kernel for these many bf16 rows: on a CPU without bf16
    arithmetic it widens the weight into small fp32 panels, 2.4-5x torch's speed at 5-16 rows and
    1.4-1.8x converting the whole weight for oneDNN's fp32 GEMM at 73 (a 4 s prompt's prefill), up
    to cpu_kernels.GEMM_MAX_ROWS, where oneDNN's blocking for large products catches up."""
    return cpu_kernels.gemm_usable(x2, bias) and not native_half(torch.bfloat16)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                scales32: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (q * scales[:, None]).T (+ bias) with the fastest kernel for the shape.
    scales32: the scales in fp32 for cpu_kernels, when the caller keeps them (else converted)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    # cpu_kernels: one to four rows, or the GEMM for more
    kernel = (cpu_kernels.int8_linear if cpu_kernels.usable(x2, bias)
              else cpu_kernels.gemm if use_cpu_gemm(x2, bias) else None)
    if kernel is not None:
        y = kernel(x2.contiguous(), q, scales.float() if scales32 is None else scales32, bias)
        return y.reshape(*lead, q.shape[0])
    if use_int8_gemv(x2):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scales.to(x2.dtype))
    else:
        y = converted_linear(x2, q, scales)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, q.shape[0])


def converted_linear(x2: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [rows, K] @ w.T (int8 w, or a float w of another dtype than `matmul_dtype(x2)`), times
    per-column scales, plus bias, as a dense GEMM in `matmul_dtype(x2)` (int8 values are exact in
    bf16 and fp32), returned in x2's dtype. Weight
    rows are converted block by block into one reused buffer: a fresh tensor per matmul costs ~8x
    the conversion itself in page faults, and blocks bound the buffer."""
    dtype = matmul_dtype(x2)
    xc = x2.to(dtype).contiguous()
    N, K = w.shape
    # oneDNN's fp32 matmul on a plain weight: 2x MKL's for 16-60 rows on a 2-core AVX2 EPYC
    onednn = dtype == torch.float32 and x2.device.type == "cpu" and torch.backends.mkldnn.is_available()
    matmul = (lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")) if onednn else F.linear
    rows = min(N, QUANT_GEMM_ROWS)
    buf = _scratch(rows * K, dtype, x2.device)
    if N == rows:
        block = buf.view(N, K)
        block.copy_(w)
        y = matmul(xc, block)
    else:
        y = torch.empty(x2.shape[0], N, dtype=dtype, device=x2.device)
        for i in range(0, N, rows):
            n = min(rows, N - i)
            block = buf[: n * K].view(n, K)
            block.copy_(w[i : i + n])
            y[:, i : i + n] = matmul(xc, block)
    return _scaled(y, scales, bias).to(x2.dtype)


def _scaled(y: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if scales is not None:
        y = y * scales.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def int8_dynamic_linear(x: torch.Tensor, q: torch.Tensor, scales127: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Like int8_linear, but each row of x is rounded to int8 with its own scale first and the
    product runs int8 x int8 -> int32. scales127: the weight scales in fp32, divided by 127."""
    lead, K = x.shape[:-1], x.shape[-1]
    a = x.reshape(-1, K).float()
    amax = torch.linalg.vector_norm(a, float("inf"), dim=-1, keepdim=True).clamp_(min=1e-12)
    xq = (a * (127.0 / amax)).round_().to(torch.int8)
    y = (torch._int_mm(xq, q.t()) * scales127 * amax).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, q.shape[0])


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP):
    """[N, K] float weight -> (codes uint8 [N, K] in 0..15, scales_and_zeros bf16 [K / group, N, 2])
    with w ~ (code - 8) * scale + zero per group of `group` columns, the layout the CPU int4
    kernel takes. Scale and zero are rounded to bf16 before the codes are chosen, so the codes
    are the best ones for what the kernel computes with."""
    N, K = w.shape
    if K % group:
        raise InputError(f"int4 needs input sizes that are multiples of {group}, got {K}")
    g = w.float().reshape(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    codes = ((g - zero[..., None]) / scale[..., None] + 8).round_().clamp_(0, 15).to(torch.uint8).reshape(N, K)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return codes, sz


def int4_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for an int4 weight (`packed` in the CPU kernel's layout)."""
    lead, K = x.shape[:-1], x.shape[-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, K).contiguous(), packed, K // sz.shape[0], sz.to(x.dtype))
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, packed.shape[0])


class Int4Linear(nn.Module):
    """Drop-in for nn.Linear with 4-bit weights: `weight` in the CPU int4 kernel's packed
    layout, and `scales_and_zeros`."""

    def __init__(self, codes: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        self.register_buffer("scales_and_zeros", sz)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return int4_linear(x, self.weight, self.scales_and_zeros, self.bias)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The weight the kernel multiplies by (read back through it: the packing is its own)."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        return int4_linear(eye, self.weight, self.scales_and_zeros.float()).t().to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {INT4_GROUP}"


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weights; same attribute names (`weight`, `bias`) plus
    `scales`, so module paths and the fast engine find them where they were. `dynamic`:
    quantize activations too (the "int8-dyn" mode)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dynamic: bool = False):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dynamic = dynamic

    def forward(self, x):
        if self.dynamic:
            return int8_dynamic_linear(x, self.weight, self.scales.float() / 127.0, self.bias)
        return int8_linear(x, self.weight, self.scales, self.bias)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def _quantized(weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> nn.Module:
    if mode == "int4":
        return Int4Linear(*quantize_int4(weight), bias)
    return Int8Linear(*quantize_int8(weight), bias, dynamic=mode == "int8-dyn")


def quantize_linear(lin: nn.Linear, mode: str = "int8") -> nn.Module:
    """An nn.Linear as the Int8Linear or Int4Linear of a quantize_model mode."""
    return _quantized(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), mode)


def _replace_linears(module: nn.Module, mode: str) -> int:
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, quantize_linear(child, mode))
            n += 1
        else:
            n += _replace_linears(child, mode)
    return n


@torch.no_grad()
def quantize_model(model, mode: str = "int8", backbone: bool = True, depthformer: bool = True,
                   text_head: bool = True):
    """Quantize an LFM2AudioModel's decode-time linears in place; returns the model.

    backbone: the LFM2 layers' projections (attention, short-conv, feed-forward);
    depthformer: its blocks and depth_linear; text_head: `model.lfm.text_head`, an int8 copy of
    the tied embedding for the text logits (the embedding itself stays for input lookups).
    mode: "int8" (weight-only), "int8-dyn" (activations quantized per row too) or "int4"
    (weight-only, grouped), see above.
    """
    if mode not in QUANT_MODES:
        raise InputError(f"quantize must be one of {QUANT_MODES}, got {mode!r}")
    if getattr(model, "quantized", None):
        raise InputError(f"model is already quantized ({model.quantized})")
    if mode == "int4" and next(model.parameters()).device.type != "cpu":
        raise InputError("int4 runs on the CPU only (torch's int4 kernel for CPU)")
    if backbone:
        for layer in model.lfm.layers:
            _replace_linears(layer, mode)
    if depthformer:
        _replace_linears(model.depthformer, mode)
        model.depth_linear = quantize_linear(model.depth_linear, mode)
    if text_head:
        model.lfm.text_head = _quantized(model.lfm.embed_tokens.weight.detach(), None, mode)
    model.quantized = mode
    return model

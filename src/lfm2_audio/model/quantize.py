"""Weight-only int8 for the decode-time matmuls (backbone, depthformer, depth_linear, text head).

Decoding one token reads every weight once for a single activation row, so its speed is the
weight bytes over memory bandwidth: int8 halves the bytes of bf16. Weights are stored as int8
with one symmetric scale per output channel (row); activations stay in the model's dtype, so
no activation statistics are needed and the error is the weight rounding alone.

Kernels (CPU, torch 2.13, measured on the 2-core dev box; see bench/generate.py):
  * one to a few rows: `aten._weight_int8pack_mm` (int8 weight x bf16 activation, per-row bf16
    scales) reads the int8 bytes directly, about 2x a bf16 GEMV;
  * many rows (prefill): dequantize to the activation dtype and run the dense GEMM, which is
    compute-bound anyway and far faster there than the int8 GEMV kernel;
  * fp32 activations: the int8 kernel has no fast fp32 path, so dequantize (correct, slow);
    int8 is meant for bf16 models.

The conformer and adapter run once per input clip (compute-bound prefill), and the audio and
depth embedding tables are only gathered from, so they stay as they are. The text head
(`h @ embed_tokens.T`, 65536 x 2048) gets its own int8 copy: input lookups keep the exact
table and the model's dtype.

A quantized model is for inference: its state dict holds int8 weights and scales, which
`save_pretrained` would write as-is; keep the original checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

QUANT_MODES = ("int8",)
# Above this many activation rows the int8 GEMV kernel loses to dequantize + dense GEMM.
INT8_GEMV_MAX_ROWS = 4


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


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (q * scales[:, None]).T (+ bias) with the fastest kernel for the shape."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype in (torch.bfloat16, torch.float16) and (x2.shape[0] <= INT8_GEMV_MAX_ROWS or x2.device.type == "cuda"):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scales.to(x2.dtype))
    else:
        # Dequantize in the activation dtype: exact products of int8 x scale, then a dense GEMM.
        y = F.linear(x2, q.to(x2.dtype) * scales.to(x2.dtype)[:, None])
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, q.shape[0])


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weights; same attribute names (`weight`, `bias`) plus
    `scales`, so module paths and the fast engine find them where they were."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        q, s = quantize_int8(lin.weight.detach())
        bias = None if lin.bias is None else lin.bias.detach()
        return cls(q, s, bias)

    def forward(self, x):
        return int8_linear(x, self.weight, self.scales, self.bias)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def _replace_linears(module: nn.Module) -> int:
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
            n += 1
        else:
            n += _replace_linears(child)
    return n


@torch.no_grad()
def quantize_model(model, mode: str = "int8", text_head: bool = True):
    """Quantize an LFM2AudioModel's decode-time linears in place; returns the model.

    Backbone (attention, short-conv and feed-forward projections), depthformer blocks and
    depth_linear become Int8Linear; with `text_head`, `model.lfm.text_head` holds an int8 copy
    of the tied embedding for the text logits (the embedding itself stays for input lookups).
    """
    if mode not in QUANT_MODES:
        raise InputError(f"quantize must be one of {QUANT_MODES}, got {mode!r}")
    if getattr(model, "quantized", None):
        raise InputError(f"model is already quantized ({model.quantized})")
    for layer in model.lfm.layers:
        _replace_linears(layer)
    _replace_linears(model.depthformer)
    model.depth_linear = Int8Linear.from_linear(model.depth_linear)
    if text_head:
        q, s = quantize_int8(model.lfm.embed_tokens.weight.detach())
        model.lfm.text_head = Int8Linear(q, s, None)
    model.quantized = mode
    return model

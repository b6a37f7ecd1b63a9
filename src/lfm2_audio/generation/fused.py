"""One-row decode through a few fused Triton kernels (the CUDA graph path at batch 1).

An audio frame is 48 depthformer layer steps, each four matrix-vector products over small
weights (2-11 MB) with norms, a rotary embedding, an attention over <= 8 slots and residual adds
in between. As separate kernels (cuBLAS plus elementwise ops, even fused by torch.compile) that
is ~11 launches a layer step, ~570 a frame, and at batch 1 the launches cost more than reading
the weights. Here a layer step is 5 kernels:

    linear(norm=op_norm)          RMSNorm of the input, recomputed by every program, then x W^T
    depth_attention               q/k norms, interleaved-pair RoPE, the K/V cache write and the
                                  attention over the slots so far, one program per KV head
    linear(residual=x)            x + att W_out^T
    linear(norm=ffn_norm, gate)   silu(x W1^T) * (x W3^T), W1 and W3 stacked as one matrix
    linear(residual=x)            x + g W2^T

and a codebook adds the head (linear with the end-of-audio bias) and one kernel for the pick
(greedy, or a draw with temperature and top-k) and the next slot's input (pick_embed_add).
Folding the attention into the out projection, each program redoing it, made the frame slower
on an H200 (1.98 ms of depthformer against 1.28). The backbone's one-row
decode step runs its four projections through the same `linear` (norm_style "hf"), the conv or
attention between them unchanged. Every rounding to the model dtype happens where the torch ops
round, so results agree with the graph path and the plain path to rounding.

On Hopper and later every kernel is launched with programmatic dependent launch (PDL): it
lets the next kernel start as soon as it begins, and that kernel reads its first weight tile,
which no kernel writes, before it waits for this one to finish. The launch gap and the first
DRAM round trip of each of the ~260 kernels of a frame then overlap the kernel before it. Every
kernel waits (gdc_wait) before it reads an activation or writes anything, so a kernel's wait
also covers every kernel before it. LFM2_AUDIO_PDL=0 turns it off (for side-by-side timing).

With TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors
through Triton's interpreter (how the CPU tests check them).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PDL_DEVICES: dict[int, bool] = {}


def uses_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: compiled kernels on sm_90 and later."""
    if INTERPRET or device.type != "cuda" or os.environ.get("LFM2_AUDIO_PDL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PDL_DEVICES:
        _PDL_DEVICES[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _PDL_DEVICES[index]


def _launch(x: torch.Tensor) -> dict:
    return {"PDL": True, "launch_pdl": True} if uses_pdl(x.device) else {"PDL": False}


@triton.jit
def _wait_for_previous(PDL: tl.constexpr):
    """Let the next kernel launch now, then wait until the previous one has finished."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def _linear_kernel(x_ptr, w_ptr, norm_ptr, bias_ptr, res_ptr, out_ptr, N, K, eps,
                   NORM: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n] = epilogue(sum_k prologue(x)[k] * W[n, k]) for one row x [K], W [N (2N with GATE), K].
    NORM 1: RMSNorm with the weight applied in fp32 before rounding (the depthformer's); 2: the
    normalised x rounded, then times the weight and rounded again (the backbone's)."""
    out_ty = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    tile = w_ptr + rows[:, None] * K + cols[None, :]
    # Each weight tile is loaded one step ahead of its use; the first before the wait.
    w = tl.load(tile, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    if GATE:
        wb = tl.load(tile + N * K, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    _wait_for_previous(PDL)
    if NORM:
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            squares += xv * xv
        inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    # Products summed per lane across the loop, reduced across lanes once at the end.
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if GATE:
        acc_b = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        c_ok = c < K
        xv = tl.load(x_ptr + c, mask=c_ok, other=0.0)
        if NORM == 1:
            g = tl.load(norm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            xv = (xv.to(tl.float32) * inv_rms * g).to(out_ty)
        elif NORM == 2:
            g = tl.load(norm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            xv = ((xv.to(tl.float32) * inv_rms).to(out_ty).to(tl.float32) * g).to(out_ty)
        xf = xv.to(tl.float32)[None, :]
        next_ok = row_ok[:, None] & (c + BLOCK_K < K)[None, :]
        w_next = tl.load(tile + k0 + BLOCK_K, mask=next_ok, other=0.0)
        acc += w.to(tl.float32) * xf
        w = w_next
        if GATE:
            wb_next = tl.load(tile + N * K + k0 + BLOCK_K, mask=next_ok, other=0.0)
            acc_b += wb.to(tl.float32) * xf
            wb = wb_next
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = y.to(out_ty).to(tl.float32)  # F.linear's output rounding
    if GATE:
        b = tl.sum(acc_b, axis=1).to(out_ty).to(tl.float32)
        y = ((y * tl.sigmoid(y)).to(out_ty).to(tl.float32) * b).to(out_ty).to(tl.float32)
    if HAS_RES:
        y += tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ty), mask=row_ok)


# Weight tiles for the autotuner: the best one depends on the matrix (2 to 32 MB here) and card.
# The wide ones read a program's rows (K <= 4096) in one or two tiles, so in one or two round
# trips, the first before the PDL wait.
_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
            for n, k, w in ((4, 512, 4), (8, 256, 4), (8, 512, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8),
                            (2, 1024, 4), (4, 1024, 8), (2, 2048, 8), (1, 4096, 8))]
_linear_tuned = triton.autotune(_CONFIGS, key=["N", "K", "NORM", "GATE"])(_linear_kernel)


NORM_STYLES = {"liquid": 1, "hf": 2}


def linear(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
           bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, gate: bool = False,
           norm_style: str = "liquid") -> torch.Tensor:
    """One row x [..., K] (contiguous) -> [..., N]: x W^T (+ bias), with an optional RMSNorm of x
    first (weight `norm`, rounded as `norm_style` says), silu(x W1^T) * (x W3^T) for gate=True
    (W = [W1; W3]), and + residual."""
    x = x.contiguous()
    K = x.shape[-1]
    if weight.shape[1] != K or not weight.is_contiguous():
        raise ValueError(f"fused.linear needs a contiguous [N, {K}] weight, got {tuple(weight.shape)} "
                         f"with strides {weight.stride()}")
    N = weight.shape[0] // (2 if gate else 1)
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    flags = dict(NORM=0 if norm is None else NORM_STYLES[norm_style], GATE=gate, HAS_BIAS=bias is not None,
                 HAS_RES=residual is not None)
    args = (x, weight, x if norm is None else norm, x if bias is None else bias,
            x if residual is None else residual.contiguous(), out, N, K, eps)
    if INTERPRET:  # few, large programs: the interpreter's cost is per program
        _linear_kernel[(triton.cdiv(N, 256),)](*args, **flags, PDL=False, BLOCK_N=256, BLOCK_K=128)
    else:
        _linear_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags, **_launch(x))
    return out


@triton.jit
def _norm_rope(qkv_ptr, norm_ptr, heads, d, cos, sin, eps, HD: tl.constexpr, out_ty: tl.constexpr):
    """Heads [R] of qkv: RMSNorm (fp32 weight rows), rounded, then RoPE on (2i, 2i+1) pairs,
    rounded again; returned in fp32 [R, HD]."""
    at = heads[:, None] * HD + d[None, :]
    pair = heads[:, None] * HD + (d ^ 1)[None, :]
    x = tl.load(qkv_ptr + at).to(tl.float32)
    x_pair = tl.load(qkv_ptr + pair).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / HD + eps)[:, None]
    normed = (x * inv_rms * tl.load(norm_ptr + at)).to(out_ty).to(tl.float32)
    normed_pair = (x_pair * inv_rms * tl.load(norm_ptr + pair)).to(out_ty).to(tl.float32)
    return (normed * cos[None, :] + normed_pair * sin[None, :]).to(out_ty).to(tl.float32)


@triton.jit
def _depth_attention_kernel(qkv_ptr, qk_norm_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, out_ptr, slot, eps,
                            scale, H: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr, SLOTS: tl.constexpr,
                            PDL: tl.constexpr):
    """KV head `program_id` of one row: its G query heads attend over slots [0, slot]."""
    _wait_for_previous(PDL)
    out_ty = out_ptr.dtype.element_ty
    G: tl.constexpr = H // KV
    kv = tl.program_id(0)
    d = tl.arange(0, HD)
    cos = tl.load(cos_ptr + d)
    sin = tl.load(sin_ptr + d)
    q_heads = kv * G + tl.arange(0, G)
    q = _norm_rope(qkv_ptr, qk_norm_ptr, q_heads, d, cos, sin, eps, HD, out_ty)  # [G, HD]
    k_new = _norm_rope(qkv_ptr, qk_norm_ptr, H + kv + tl.arange(0, 1), d, cos, sin, eps, HD, out_ty)  # [1, HD]
    v_new = tl.load(qkv_ptr + (H + KV + kv) * HD + d).to(tl.float32)[None, :]
    # The caches keep every slot (fp32); this slot's row is taken from registers, not re-read.
    slots = tl.arange(0, SLOTS)
    cache = kv * SLOTS * HD + slots[:, None] * HD + d[None, :]
    is_new = (slots == slot)[:, None]
    keys = tl.where(is_new, k_new, tl.load(k_cache_ptr + cache))
    values = tl.where(is_new, v_new, tl.load(v_cache_ptr + cache))
    row = kv * SLOTS * HD + slot * HD + d[None, :]
    tl.store(k_cache_ptr + row, k_new)
    tl.store(v_cache_ptr + row, v_new)
    scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2) * scale  # [G, SLOTS]
    scores = tl.where((slots <= slot)[None, :], scores, float("-inf"))
    p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    att = tl.sum(p[:, :, None] * values[None, :, :], axis=1)  # [G, HD]
    tl.store(out_ptr + q_heads[:, None] * HD + d[None, :], att.to(out_ty))


def depth_attention(qkv: torch.Tensor, qk_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, eps: float, heads: int) -> torch.Tensor:
    """qkv [1, (H + 2 KV) hd] -> attention output [1, H hd]; writes slot `slot` of the fp32
    caches [1, KV, slots, hd]."""
    _, kv_heads, slots, hd = k_cache.shape
    out = torch.empty(1, heads * hd, dtype=qkv.dtype, device=qkv.device)
    _depth_attention_kernel[(kv_heads,)](qkv, qk_norm, cos, sin, k_cache, v_cache, out, slot, eps, hd**-0.5,
                                         H=heads, KV=kv_heads, HD=hd, SLOTS=slots, **_launch(qkv))
    return out


@triton.jit
def _pick_embed_add_kernel(code_ptr, logits_ptr, noise_ptr, temperature_ptr, V, table_ptr, z_ptr, out_ptr, D,
                           SAMPLE: tl.constexpr, TOP_K: tl.constexpr, EMBED: tl.constexpr, PDL: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """The code, written to code_ptr: SAMPLE 0, argmax(logits); 1, a draw as `cuda_graphs.pick`
    makes it, argmax of softmax(logits / T) (restricted to the TOP_K largest, 0: all) over Exp(1)
    noise; the first of ties, as torch. With EMBED, out = z + table[code]."""
    _wait_for_previous(PDL)
    v = tl.arange(0, BLOCK_V)
    scores = tl.load(logits_ptr + v, mask=v < V, other=float("-inf")).to(tl.float32)
    if SAMPLE:
        scores = scores / tl.load(temperature_ptr)
        if TOP_K:  # the TOP_K-th largest score, counting repeats, as torch.topk
            if TOP_K <= 16:  # take the best out TOP_K - 1 times: a few reductions, no sort
                rest = scores
                for _ in tl.static_range(TOP_K - 1):
                    rest = tl.where(v == tl.argmax(rest, axis=0, tie_break_left=True), float("-inf"), rest)
                kth = tl.max(rest, axis=0)
            else:
                ranked = tl.sort(scores, descending=True)
                kth = tl.max(tl.where(v == TOP_K - 1, ranked, float("-inf")), axis=0)
            scores = tl.where(scores < kth, float("-inf"), scores)
        # softmax's normalisation scales every entry alike, so the argmax skips it
        scores = tl.exp(scores - tl.max(scores, axis=0)) / tl.load(noise_ptr + v, mask=v < V, other=1.0)
    code = tl.argmax(scores, axis=0, tie_break_left=True)
    tl.store(code_ptr, code.to(code_ptr.dtype.element_ty))
    if EMBED:
        out_ty = out_ptr.dtype.element_ty
        at = tl.arange(0, BLOCK_D)
        ok = at < D
        e = tl.load(table_ptr + code * D + at, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, (z + e).to(out_ty), mask=ok)


def pick_embed_add(logits: torch.Tensor, code: torch.Tensor, table: torch.Tensor | None = None,
                   z: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, top_k: int = 0) -> torch.Tensor | None:
    """The code for logits [1, V], greedy (temperature None) or drawn as `cuda_graphs.pick`
    draws it (temperature a 0-d fp32 tensor, noise [1, V] ~ Exp(1), top_k 0: all), written
    into `code` (one int64 element, a view is fine); with a table, also returns z [1, D] +
    table[code]: the pick and the next slot's input in one launch."""
    V = logits.shape[-1]
    embed = table is not None
    D = z.shape[-1] if embed else 1
    out = torch.empty_like(z) if embed else None
    sampled = temperature is not None
    _pick_embed_add_kernel[(1,)](code, logits, noise if sampled else logits, temperature if sampled else logits, V,
                                 table if embed else logits, z if embed else logits, out if embed else logits, D,
                                 SAMPLE=sampled, TOP_K=top_k if sampled and top_k < V else 0, EMBED=embed,
                                 BLOCK_V=triton.next_power_of_2(V), BLOCK_D=triton.next_power_of_2(D),
                                 **_launch(logits))
    return out


def layer_step(x, w, k_cache, v_cache, slot: int, cos, sin, eps: float, qk_eps: float, heads: int):
    """One depthformer layer at codebook slot `slot` for one row x [1, dim] (w: an AttnBlock
    with fp32 norm weights)."""
    qkv = linear(x, w.qkv, norm=w.op_norm, eps=eps)
    att = depth_attention(qkv, w.qk_norm, cos, sin, k_cache, v_cache, slot, qk_eps, heads)
    x = linear(att, w.out, residual=x)
    g = linear(x, w.w13, norm=w.ffn_norm, eps=eps, gate=True)
    return linear(g, w.w2, residual=x)

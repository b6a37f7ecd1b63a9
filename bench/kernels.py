"""One-row projections at official size: fused.linear against cuBLAS (F.linear), per shape.

    python3 bench/kernels.py            # on a CUDA machine with Triton

Prints one JSON line per shape: microseconds per call and the weight bandwidth it reaches
(GB/s), for F.linear alone, for F.linear with the RMSNorm and residual add it needs as torch
ops, and for fused.linear doing all three in one kernel. Each figure is the mean over a CUDA
graph of 50 back-to-back calls (different weights each, so no call reads another's weights from
L2), which is how the decode graphs launch them; the tile the autotuner chose is listed.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

# (name, N, K, gate): the depthformer's and the backbone's one-row projections.
SHAPES = [
    ("depth.qkv", 1536, 1024, False), ("depth.out", 1024, 1024, False), ("depth.w13", 2816, 1024, True),
    ("depth.w2", 1024, 2816, False), ("depth.head", 2049, 1024, False),
    ("backbone.qkv", 3072, 2048, False), ("backbone.in_proj", 6144, 2048, False), ("backbone.out", 2048, 2048, False),
    ("backbone.w13", 8192, 2048, True), ("backbone.w2", 2048, 8192, False),
]
CALLS = 50
DEVICE = "cuda"


def per_call_us(fn) -> float:
    fn()  # compile, autotune
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (5 * CALLS)


@torch.inference_mode()
def main() -> int:
    from lfm2_audio.generation import fused
    from lfm2_audio.generation.fast import _rms_hf

    dev, dt = DEVICE, torch.bfloat16
    for name, N, K, gate in SHAPES:
        rows = 2 * N if gate else N
        weights = [torch.randn(rows, K, device=dev, dtype=dt) * 0.02 for _ in range(CALLS)]
        x = torch.randn(1, K, device=dev, dtype=dt)
        norm = torch.ones(K, device=dev, dtype=dt)
        res = torch.randn(1, N, device=dev, dtype=dt)
        gb = rows * K * 2 / 1e9

        def cublas():
            for w in weights:
                F.linear(x, w)

        def cublas_with_ops():
            for w in weights:
                y = F.linear(_rms_hf(x, norm, 1e-5), w)
                if gate:
                    a, b = y.chunk(2, dim=-1)
                    F.silu(a) * b
                else:
                    res + y

        def fused_kernel():
            for w in weights:
                if gate:
                    fused.linear(x, w, norm=norm, eps=1e-5, gate=True, norm_style="hf")
                else:
                    fused.linear(x, w, norm=norm, eps=1e-5, residual=res, norm_style="hf")

        out = {"shape": name, "N": N, "K": K, "gate": gate, "weight_mb": round(gb * 1000, 1)}
        for label, fn in (("cublas", cublas), ("cublas_with_ops", cublas_with_ops), ("fused", fused_kernel)):
            us = per_call_us(fn)
            out[f"{label}_us"] = round(us, 2)
            out[f"{label}_gbs"] = round(gb / (us * 1e-6), 0)
        best = getattr(fused._linear_tuned, "cache", None)  # the autotuner's choices, by key
        out["fused_tile"] = [str(c) for c in best.values()][-1:] if best else None
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-row projections at official size on the CPU: model/cpu_kernels.c against torch, per shape.

    .venv/bin/python bench/cpu_kernels.py [--threads 2] [--repeats 5]
    .venv/bin/python bench/cpu_kernels.py --rows 8,73    # many-row products (the GEMM), GFLOP/s

Prints one JSON line per shape and weight kind (bf16, int8): the weight bandwidth (GB/s) the C
kernel and torch's kernel reach (F.linear for bf16, aten._weight_int8pack_mm for int8), each the
best of `repeats` passes over enough different weights (512 MB in bf16, 256 MB in int8) that no
call finds its weight in the caches, as in decoding. A last line gives the machine's read bandwidth the same way
(torch's sum over 1 GiB), the figure bench/generate.py divides by for its floor.

With --rows, each shape is multiplied by that many activation rows instead (a 4 s prompt's
prefill is ~73 rows; a serving batch 5-16), which is compute-bound: GFLOP/s of the C GEMM
against what the engine runs without it (torch's bf16 matmul below 16 rows, else the weight
converted to fp32 for oneDNN; for int8 the int8 values converted the same way). A last line
gives the cores' FMA peak (cpu_kernels.fma_gflops), the ceiling of these rates.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from kernels import SHAPES  # the depthformer's and the backbone's one-row projections

STREAM_BYTES = 512 << 20


def best_pass_s(calls, repeats: int) -> float:
    """Seconds per call: the best of `repeats` passes over every call."""
    for call in calls:
        call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - start) / len(calls))
    return best


def gemm_lines(rows: int, repeats: int) -> None:
    from lfm2_audio.model import cpu_kernels
    from lfm2_audio.model.quantize import converted_linear, matmul_dtype, quantize_int8

    for name, N, K, gate in SHAPES:
        n = 2 * N if gate else N
        x = torch.randn(rows, K, dtype=torch.bfloat16)
        weights = [torch.randn(n, K, dtype=torch.bfloat16) for _ in range(2)]  # not both in the caches
        gflop = 2 * rows * n * K / 1e9
        line = {"shape": name, "rows": rows, "out": n, "cols": K}
        torch_bf16 = converted_linear if matmul_dtype(x) != x.dtype else F.linear
        line["bf16_c_gflops"] = gflop / best_pass_s([lambda w=w: cpu_kernels.gemm(x, w) for w in weights], repeats)
        line["bf16_torch_gflops"] = gflop / best_pass_s([lambda w=w: torch_bf16(x, w) for w in weights], repeats)
        int8 = [quantize_int8(w) for w in weights]
        line["int8_c_gflops"] = gflop / best_pass_s([lambda q=q, s=s.float(): cpu_kernels.gemm(x, q, s)
                                                     for q, s in int8], repeats)
        line["int8_torch_gflops"] = gflop / best_pass_s([lambda q=q, s=s: converted_linear(x, q, s)
                                                         for q, s in int8], repeats)
        print_line(line)


def print_line(line: dict) -> None:
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in line.items()}), flush=True)


@torch.inference_mode()
def main(argv=None) -> int:
    from lfm2_audio.model import cpu_kernels
    from lfm2_audio.model.quantize import quantize_int8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", default=None, help="comma-separated activation row counts (> 4): the GEMM")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if cpu_kernels.library() is None:
        print(json.dumps({"error": "the CPU kernels do not run here (no AVX2, no C compiler, or switched off)"}))
        return 1
    if args.rows:
        for rows in (int(r) for r in args.rows.split(",")):
            gemm_lines(rows, args.repeats)
        print(json.dumps({"fma_peak_gflops": round(cpu_kernels.fma_gflops(args.threads), 1)}))
        return 0
    for name, N, K, gate in SHAPES:
        rows = 2 * N if gate else N
        count = max(2, STREAM_BYTES // (rows * K))
        x = torch.randn(1, K, dtype=torch.bfloat16)
        weights = [torch.randn(rows, K, dtype=torch.bfloat16) for _ in range(count)]
        line = {"shape": name, "rows": rows, "cols": K, "weights": count}
        gb = rows * K * 2 / 1e9
        line["bf16_c_gbs"] = gb / best_pass_s([lambda w=w: cpu_kernels.bf16_linear(x, w) for w in weights], args.repeats)
        line["bf16_torch_gbs"] = gb / best_pass_s([lambda w=w: F.linear(x, w) for w in weights], args.repeats)
        int8 = [quantize_int8(w) for w in weights]  # half the bytes: still far more than the caches
        del weights
        gb /= 2
        line["int8_c_gbs"] = gb / best_pass_s([lambda q=q, s=s.float(): cpu_kernels.int8_linear(x, q, s)
                                               for q, s in int8], args.repeats)
        line["int8_torch_gbs"] = gb / best_pass_s([lambda q=q, s=s: torch.ops.aten._weight_int8pack_mm(x, q, s)
                                                   for q, s in int8], args.repeats)
        print_line(line)
    big = torch.ones(1 << 29, dtype=torch.bfloat16)
    print(json.dumps({"read_gbs": round(2 ** 30 / best_pass_s([big.sum], args.repeats) / 1e9, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

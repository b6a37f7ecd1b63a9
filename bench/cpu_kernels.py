"""One-row projections at official size on the CPU: model/cpu_kernels.c against torch, per shape.

    .venv/bin/python bench/cpu_kernels.py [--threads 2] [--repeats 5]

Prints one JSON line per shape and weight kind (bf16, int8): the weight bandwidth (GB/s) the C
kernel and torch's kernel reach (F.linear for bf16, aten._weight_int8pack_mm for int8), each the
best of `repeats` passes over enough different weights (512 MB in bf16, 256 MB in int8) that no
call finds its weight in the caches, as in decoding. A last line gives the machine's read bandwidth the same way
(torch's sum over 1 GiB), the figure bench/generate.py divides by for its floor.
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


@torch.inference_mode()
def main(argv=None) -> int:
    from lfm2_audio.model import cpu_kernels
    from lfm2_audio.model.quantize import quantize_int8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if cpu_kernels.library() is None:
        print(json.dumps({"error": "the CPU kernels do not run here (no AVX2, no C compiler, or switched off)"}))
        return 1
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
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in line.items()}), flush=True)
    big = torch.ones(1 << 29, dtype=torch.bfloat16)
    print(json.dumps({"read_gbs": round(2 ** 30 / best_pass_s([big.sum], args.repeats) / 1e9, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

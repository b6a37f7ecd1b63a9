"""What rounding the weights alone costs: an fp32 model whose decode-time weights are rounded
(and stored back in fp32) against the same model unrounded, over teacher-forced greedy steps.

    .venv/bin/python bench/quant_error.py                                   # random official size
    .venv/bin/python bench/quant_error.py --model CHECKPOINT_DIR --schemes int8,int4-g32

Activations stay fp32 and every product is torch's fp32 matmul, so the only difference between
the two runs is the weights: this is the best any kernel for a scheme can do. bench/generate.py
--quantize measures the real kernels against the bf16 path instead (its quant_* fields, which
these lines repeat). The weights rounded are those quantize_model rounds: the backbone's and
depthformer's linears, depth_linear and a copy of the tied text head.

Schemes: `int8` symmetric per output row, as --quantize int8 stores it; `int8-gG` symmetric per
group of G input columns (not a runtime format: what finer scales would buy); `int4-gG`
asymmetric per group, as --quantize int4 rounds at G = 32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from generate import make_prompt, random_official, reference_run, replay_quality
from lfm2_audio.model.lfm2_audio import LFM2AudioModel
from lfm2_audio.model.quantize import dequantize_int8, quantize_int4, quantize_int8


def int8_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    scale = (g.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return ((g / scale).round().clamp(-127, 127) * scale).reshape(N, K)


def int4_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    codes, sz = quantize_int4(w, group)
    N, K = w.shape
    scale, zero = (sz.float().transpose(0, 1)[..., i, None] for i in (0, 1))  # [N, K / group, 1]
    return ((codes.float().reshape(N, K // group, group) - 8) * scale + zero).reshape(N, K)


def rounding(scheme: str):
    """(the weight -> rounded weight (fp32) function, the input columns a scale covers, 1 for a
    whole row) of a scheme name."""
    kind, _, group = scheme.partition("-g")
    if kind == "int8" and not group:
        return (lambda w: dequantize_int8(*quantize_int8(w))), 1
    if kind in ("int8", "int4") and group.isdigit():
        fn = int8_groups if kind == "int8" else int4_groups
        return (lambda w: fn(w, int(group))), int(group)
    raise SystemExit(f"unknown scheme {scheme!r}: int8, int8-gG or int4-gG")


def rounded_linears(model) -> list[nn.Linear]:
    found = [m for part in (model.lfm.layers, model.depthformer) for m in part.modules() if isinstance(m, nn.Linear)]
    return found + [model.depth_linear]


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-official")
    ap.add_argument("--schemes", default="int8,int8-g128,int8-g64,int8-g32,int4-g32")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "random-official":  # bf16 values, as the bf16 model holds them, computed in fp32
        model = random_official(torch.bfloat16).float()
    else:
        model = LFM2AudioModel.from_pretrained(args.model, dtype=torch.float32)
    prompt = make_prompt(model)
    record = reference_run(model, prompt, args.steps)
    linears = rounded_linears(model)
    originals = [lin.weight.detach().clone() for lin in linears]
    table = model.lfm.embed_tokens.weight.detach()
    widths = sorted({w.shape[1] for w in originals} | {table.shape[1]})
    for scheme in args.schemes.split(","):
        fn, group = rounding(scheme)
        line = {"model": args.model, "scheme": scheme, "steps": args.steps}
        if any(width % group for width in widths):
            print(json.dumps({**line, "skipped": f"input sizes {widths} are not all multiples of {group}"}), flush=True)
            continue
        t = time.perf_counter()
        for lin, w in zip(linears, originals):
            lin.weight.copy_(fn(w))
        head = nn.Linear(table.shape[1], table.shape[0], bias=False)
        head.weight = nn.Parameter(fn(table), requires_grad=False)
        model.lfm.text_head = head  # the text logits read the rounded copy, the inputs the exact table
        line.update({k: round(v, 4) for k, v in replay_quality(model, model, prompt, record).items()})
        line["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Speed of the LFM2.5 audio detokenizer at official size (random weights): one JSON line.

    python bench/detokenizer_bench.py [--seconds 10] [--threads 2] [--device cpu]

rtf = compute time / audio duration (below 1 is faster than real time). Streaming decodes one
code frame (80 ms) per call, as a speech generator would; frame_latency_ms is the median time
of one such call, and the first 1440 samples of a frame come out of that call (the last 480
wait for the next frame, see codec/detokenizer.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lfm2_audio.codec.detokenizer import Detokenizer
from lfm2_audio.config import Lfm2Config

OFFICIAL = dict(
    vocab_size=65536,
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    intermediate_size=3328,
    layer_types=["conv", "conv", "sliding_attention", "conv", "sliding_attention", "conv", "sliding_attention", "conv"],
    sliding_window=30,
    output_size=1282,
)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Detokenizer(Lfm2Config.from_dict(OFFICIAL)).to(args.device).eval()
    frames = round(args.seconds * model.sample_rate / model.frame_samples)
    codes = torch.randint(0, 2048, (1, 8, frames), device=args.device)
    audio_s = frames * model.frame_samples / model.sample_rate

    model.decode(codes[:, :, :8])  # warm-up
    whole = []
    for _ in range(args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        ref = model.decode(codes)
        sync(args.device)
        whole.append(time.perf_counter() - t0)

    per_frame, total = [], []
    for _ in range(args.repeats):
        stream = model.stream(1)
        outs = []
        sync(args.device)
        t_all = time.perf_counter()
        for t in range(frames):
            t0 = time.perf_counter()
            outs.append(stream.decode(codes[:, :, t : t + 1]))
            sync(args.device)
            per_frame.append(time.perf_counter() - t0)
        outs.append(stream.flush())
        sync(args.device)
        total.append(time.perf_counter() - t_all)
    streamed = torch.cat(outs, dim=1)
    err = ((streamed - ref).abs().max() / ref.abs().max()).item()

    print(json.dumps({
        "codec": "detokenizer",
        "device": str(args.device),
        "threads": args.threads,
        "audio_s": audio_s,
        "decode_rtf": round(min(whole) / audio_s, 4),
        "stream_rtf": round(min(total) / audio_s, 4),
        "frame_latency_ms": round(1000 * statistics.median(per_frame), 2),
        "frame_latency_p95_ms": round(1000 * sorted(per_frame)[int(0.95 * len(per_frame))], 2),
        "algorithmic_lookahead_ms": 80.0,
        "stream_vs_whole_rel_err": err,
    }))


if __name__ == "__main__":
    main()

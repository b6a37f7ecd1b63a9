"""Codec decode speed: real-time factor and streaming latency. Not a test.

    python bench/codec.py [--codec mimi|detokenizer|all] [--threads 2] [--seconds 10] [--frames 50]
    python bench/codec.py --device cuda

Each codec is built at official size with random weights (speed does not depend on the values)
and prints one JSON line:

    decode_rtf          seconds of compute per second of audio, one whole-sequence decode
    stream_rtf          the same, feeding the frames one at a time to codec.stream(1)
    stream_latency_ms   median time from one frame in to its 1920 samples out (streaming)
    cpu_rel_err         off CPU: |decode here - decode on CPU| / |decode on CPU| (same weights)

To add a codec: write a builder returning an object with the codec interface
(lfm2_audio.codec: sample_rate, frame_samples, num_codebooks, decode, optionally stream) and
register it in BUILDERS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class Skip(Exception):
    """This codec cannot be benchmarked here (not written yet, or no random constructor)."""


def build_mimi():
    from lfm2_audio.codec.mimi import Mimi, MimiConfig

    torch.manual_seed(0)
    return Mimi(MimiConfig()).eval()


# The LFM2.5 `audio_detokenizer/config.json` (spec §3.6), as its from_pretrained would read it.
DETOKENIZER_CONFIG = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "layer_types": ["conv", "conv", "sliding_attention", "conv", "sliding_attention", "conv", "sliding_attention", "conv"],
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 3328,
    "block_auto_adjust_ff_dim": True,
    "conv_L_cache": 3,
    "sliding_window": 30,
    "rope_theta": 1e6,
    "norm_eps": 1e-5,
    "vocab_size": 65536,
    "output_size": 1282,
    "max_position_embeddings": 128000,
}


def build_detokenizer():
    try:
        from lfm2_audio.codec.detokenizer import Detokenizer
        from lfm2_audio.config import Lfm2Config
    except Exception as e:  # written by someone else; may not exist yet
        raise Skip(f"lfm2_audio.codec.detokenizer does not import ({type(e).__name__}: {e})") from e
    torch.manual_seed(0)
    try:
        return Detokenizer(Lfm2Config.from_dict(dict(DETOKENIZER_CONFIG))).eval()
    except Exception as e:
        raise Skip(f"could not build a random Detokenizer ({type(e).__name__}: {e})") from e


BUILDERS = {"mimi": build_mimi, "detokenizer": build_detokenizer}


def _timed(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@torch.no_grad()
def bench(name: str, codec, seconds: float, latency_frames: int, device="cpu") -> dict:
    n_frames = round(seconds * codec.sample_rate / codec.frame_samples)
    audio_s = n_frames * codec.frame_samples / codec.sample_rate
    codes = torch.randint(0, 2048, (1, codec.num_codebooks, n_frames), generator=torch.Generator().manual_seed(0))
    reference = codec.decode(codes[:, :, :8]) if device != "cpu" else None  # on CPU, before moving
    codec = codec.to(device)
    codec.decode(codes[:, :, :4])  # warm-up (allocator, kernels)
    whole = min(_timed(lambda: codec.decode(codes))[0] for _ in range(2))
    result = {
        "codec": name,
        "threads": torch.get_num_threads(),
        "audio_s": audio_s,
        "params": sum(v.numel() for v in codec.state_dict().values()) if hasattr(codec, "state_dict") else None,
        "decode_rtf": round(whole / audio_s, 4),
        "stream_rtf": None,
        "stream_latency_ms": None,
        "device": str(device),
    }
    if reference is not None:
        here = codec.decode(codes[:, :, :8]).cpu()
        result["cpu_rel_err"] = float((here - reference).norm() / reference.norm())
    if not hasattr(codec, "stream"):
        result["note"] = "no streaming decoder"
        return result
    warm = codec.stream(1)
    for t in range(3):
        warm.decode(codes[:, :, t : t + 1])
    stream = codec.stream(1)
    per_frame = []
    for t in range(n_frames):
        # (a codec may hold a few samples back for look-ahead: the detokenizer returns 1440
        # samples for its first frame, then 1920 each, and the last 480 on flush())
        per_frame.append(_timed(lambda: stream.decode(codes[:, :, t : t + 1]))[0])
    result["stream_rtf"] = round(sum(per_frame) / audio_s, 4)
    result["stream_latency_ms"] = round(1000 * statistics.median(per_frame[:latency_frames]), 2)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codec", choices=[*BUILDERS, "all"], default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0, help="audio length for the RTF runs")
    p.add_argument("--frames", type=int, default=50, help="frames for the streaming latency median")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in BUILDERS if args.codec == "all" else [args.codec]:
        try:
            codec = BUILDERS[name]()
        except Skip as e:
            print(f"# skipping {name}: {e}", file=sys.stderr)
            continue
        print(json.dumps(bench(name, codec, args.seconds, args.frames, args.device)), flush=True)


if __name__ == "__main__":
    main()

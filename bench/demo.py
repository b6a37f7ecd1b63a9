"""Speed of a model on the bundled example clips, as a user of `lfm2-audio` meets it.

    python bench/demo.py                      # the bundled demo model, 2 threads
    python bench/demo.py --model DIR --threads 4 --repeats 5

One JSON line:
  asr_rtf          transcription time / clip length (sentence.wav), best of repeats
  ttfa_s           time to first audio: a 4 s spoken question (question.wav after leading
                   silence) is complete; from the respond() call (prefill included) to the first
                   waveform samples out of the codec; median of repeats
  stream_rtf       from the first samples to the end of the answer, wall time / seconds of audio
                   produced; < 1: the answer streams faster than it plays
  reply            the text of the answer (greedy text, seeded audio sampling)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from lfm2_audio.config import VOCODERS

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "lfm2_audio" / "assets" / "examples"


def padded_question(seconds: float) -> np.ndarray:
    wave, rate = sf.read(str(EXAMPLES / "question.wav"), dtype="float32")
    if rate != 16000:
        raise SystemExit(f"expected a 16 kHz question clip, got {rate} Hz")
    lead = max(0, int(seconds * rate) - len(wave))
    return np.concatenate([np.zeros(lead, np.float32), wave])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--question-seconds", type=float, default=4.0)
    ap.add_argument("--engine", default="fast", choices=["fast", "plain"])
    ap.add_argument("--vocoder", default=None, choices=VOCODERS, help="the demo codec's vocoder")
    ap.add_argument("--min-frames", type=int, default=None,
                    help="the demo codec's stream: vocode once this many frames wait (default: the codec's, 2)")
    args = ap.parse_args(argv)

    import torch

    from lfm2_audio.pipeline import LFM2Audio, set_threads

    set_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    lfm = LFM2Audio.from_pretrained(args.model, fast=args.engine == "fast", threads=args.threads, vocoder=args.vocoder)
    out = {"model": args.model or "demo", "threads": args.threads, "engine": args.engine,
           "load_s": round(time.perf_counter() - t0, 2)}
    if args.min_frames is not None:
        lfm.codec.stream = functools.partial(lfm.codec.stream, min_frames=args.min_frames)
        out["min_frames"] = args.min_frames

    sentence, rate = sf.read(str(EXAMPLES / "sentence.wav"), dtype="float32")
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        out["transcript"] = lfm.transcribe(sentence, sample_rate=rate)
        times.append(time.perf_counter() - t)
    out["asr_rtf"] = round(min(times) / (len(sentence) / rate), 4)

    question = padded_question(args.question_seconds)
    ttfa, stream = [], []
    for i in range(args.repeats + 1):  # the first run warms caches and is not counted
        conv = lfm.chat()
        text, samples, first, t = [], 0, None, time.perf_counter()
        for event in lfm.respond(conv, question, sample_rate=16000, seed=i):
            if event.kind == "text":
                text.append(event.text)
            elif event.kind == "audio" and event.audio is not None and len(event.audio):
                first = first or time.perf_counter()
                samples += len(event.audio)
        end = time.perf_counter()
        if i and first is not None and samples:
            ttfa.append(first - t)
            stream.append((end - first) / (samples / lfm.codec.sample_rate))
        out["reply"] = "".join(text).strip()
        out["reply_audio_s"] = round(samples / lfm.codec.sample_rate, 2) if lfm.codec else None
    if ttfa:
        out["ttfa_s"] = round(statistics.median(ttfa), 3)
        out["stream_rtf"] = round(statistics.median(stream), 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

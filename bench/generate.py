"""Decode speed of the fast engine against the plain eager path, in one process.

    python bench/generate.py --model random-official --dtype bf16
    python bench/generate.py --model random-official --dtype bf16 --quantize int8
    python bench/generate.py --model random-official --dtype bf16 --quantize int4
    python bench/generate.py --model CHECKPOINT_DIR --dtype fp32 --frames 8
    python bench/generate.py --device cuda --dtype bf16 --batch 1,64,128,256 [--compile]

Prints one JSON line. For each path (`plain`: the eager modules; `fast`: FastLFM2Audio):
  prefill_s   front end + conformer + backbone over a prompt with a 4 s random waveform
              (encode_s: the conformer and adapter alone)
  ttfa_s      interleaved mode, from starting with that prompt to the first audio frame out
              (prefill + 6 text steps + 1 frame), through the real `generate` loop
  text_tok_s  text tokens/s (text head + one backbone step each), summed over --batch rows
  audio_fps   audio frames/s (depthformer frame + one backbone step each), summed over rows
  frame_ms    milliseconds per audio frame at the first --batch (1000 * batch / audio_fps)
  depth_ms    the depthformer's part of a frame (greedy, as audio_fps), and depth_ms_sampled
              with chat's audio sampling (temperature 1, top-k 4)
  sweep       with several --batch values (or on CUDA): {batch: ms per frame step}, a step being
              the depthformer frame plus one backbone step for every row; a row is real time
              while a step takes < 80 ms (80 ms of audio per frame): `realtime_streams` is the
              largest swept batch under that
Plus load_s, peak_rss_gb (and gpu_peak_gb), the memory bandwidth measured here (sums over a
1 GiB tensor, at the start and at the end, the best), the dense matmul rate measured here
(matmul_gflops: torch's, fp32 on a CPU, bf16 on a GPU; fma_peak_gflops: the cores' FMA peak, from
the CPU kernels) and the prompt's backbone work (prefill_gflop), which give each path a lower
bound on its first audio (ttfa_floor_s: those GFLOP at the higher of the two rates,
then the weight bytes of the n_text text steps and one depthformer frame at that bandwidth; the
conformer left out) and ttfa_ratio_to_floor, the weight bytes one frame reads, the
frame rate that bandwidth allows (the floor, also as floor_ms) and each path's ratio to it
(frame time / floor time; on CPU also paired_ratio_to_floor, the median over rounds of frame
steps each timed right after its own bandwidth reading, and that reading's median as
paired_bandwidth_gbs), fast/plain speed-ups, and `fast.parity`: the fast path's hidden
states (cosine, worst) and greedy frames (fraction of codes) against the plain path's on the
same inputs. On CUDA the fast path replays CUDA graphs (generation/cuda_graphs.py; --compile
fuses their small ops with torch.compile first, --graphs off measures the eager fast path)
and every timing synchronizes the device. Every timing is the best of --repeats runs (the
dev box is shared and noisy). `--model random-official` builds an official-size model with random weights in memory
(no checkpoint needed). `--exact` runs the engine bit-identical to the plain path.

With --quantize int8 (or int8-dyn, int4) the fast path runs the quantized model and the plain
baseline stays the unquantized model; the line adds the quantized quality against the unquantized fast path
(bit-identical to plain) over --quality-steps teacher-forced interleaved steps: the fraction
of steps whose greedy output (text token, or all 8 codes of a frame) matches, the fraction of
matching audio codes, and the text-logit cosine (min and mean).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch

from lfm2_audio.audio.features import log_mel
from lfm2_audio.config import AUDIO_VOCAB, END_OF_AUDIO, official_config
from lfm2_audio.generation.chat import Conversation
from lfm2_audio.generation.fast import FastLFM2Audio, use_all_cores
from lfm2_audio.generation.generate import generate
from lfm2_audio.generation.sampling import CHAT_AUDIO, GREEDY
from lfm2_audio.model import cpu_kernels
from lfm2_audio.model.lfm2_audio import LFM2AudioModel, parse_dtype
from lfm2_audio.model.quantize import QUANT_MODES, quantize_model


def forced_text(cfg) -> tuple[int, ...]:
    """n_text ordinary (non-special) token ids: interleaved mode then switches to audio."""
    base = cfg.lfm.vocab_size // 2
    return tuple(range(base, base + cfg.interleaved_n_text))


# ---- model -------------------------------------------------------------------------------------


@torch.no_grad()
def random_official(dtype: torch.dtype, seed: int = 0, device="cpu") -> LFM2AudioModel:
    """Official-size model with N(0, 0.02) weights, built directly in `dtype` on `device`."""
    cfg = official_config()
    with torch.device("meta"):
        model = LFM2AudioModel(cfg)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name or name.endswith(".bias")):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    for name, b in model.named_buffers():
        if name.endswith("running_var"):
            b.fill_(1.0)
        elif name.endswith(("running_mean", "num_batches_tracked")):
            b.zero_()
    model.codebook_offsets = torch.arange(cfg.codebooks, device=device) * AUDIO_VOCAB
    return model.eval()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def gpu_peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def memory_bandwidth_gbs(repeats: int = 5, device="cpu") -> float:
    """Read bandwidth: the best of several sums over a 1 GiB tensor (far larger than any cache),
    in fp32 and in bf16 (the fp32 sum can be compute-bound on few cores); the faster counts."""
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones((1 << 30) // torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device=device)
        a.sum()
        best = max(best, read_gbs(a, repeats))
        del a
    return best


def read_gbs(a: torch.Tensor, repeats: int) -> float:
    """GB/s of the best of `repeats` sums over `a`."""
    return a.numel() * a.element_size() / min(_timed(a.sum) for _ in range(repeats)) / 1e9


def weight_bytes(m) -> dict:
    """Weight bytes a decode step reads, by part: `backbone` (one position through every layer),
    `text_head` (the text logits) and `depth` (depth_linear, then for each of the K codebooks the
    depthformer and that codebook's head). m: the plain model, or the fast engine (its own
    weights, e.g. int8)."""
    if hasattr(m, "bytes_per_frame"):
        return {"backbone": m.lfm.bytes_per_step, "text_head": m.text_head.bytes, "depth": m.depth.bytes_per_frame}

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    depth = size(p for p in m.depthformer.parameters() if p.dim() > 1)
    heads = size(e.logits_weight() for e in m.depth_embeddings)
    return {"backbone": size(backbone_matrices(m)), "text_head": size([m.lfm.embed_tokens.weight]),
            "depth": size(m.depth_linear.parameters()) + m.cfg.codebooks * depth + heads}


def backbone_matrices(model):
    """The backbone layers' weight matrices (and conv kernels): what a position multiplies by."""
    return (p for layer in model.lfm.layers for p in layer.parameters() if p.dim() > 1)


def frame_bytes(parts: dict) -> int:
    """Weight bytes one audio frame reads (of weight_bytes' parts): a backbone step and the
    depthformer frame."""
    return parts["backbone"] + parts["depth"]


def ttfa_floor_s(parts: dict, n_text: int, prefill_gflop: float, gflops: float, bandwidth_gbs: float) -> float:
    """A lower bound on the time to first audio: the prefill's backbone products at the
    machine's matmul rate (the conformer left out), then the weights read by n_text text steps
    (text head and backbone step) and one depthformer frame at its read bandwidth."""
    read = n_text * (parts["text_head"] + parts["backbone"]) + parts["depth"]
    return prefill_gflop / gflops + read / (bandwidth_gbs * 1e9)


def prefill_gflop(model, positions: int) -> float:
    """Multiply-adds of the backbone's weights over the prompt's positions, as GFLOP."""
    return 2 * positions * sum(p.numel() for p in backbone_matrices(model)) / 1e9


def matmul_gflops(device, repeats: int = 5) -> float:
    """torch's dense matmul rate here: fp32 on a CPU (oneDNN), bf16 on a GPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n // 2, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * (n // 2) * n * n / best_of(lambda: a @ b, repeats) / 1e9


# ---- prompt ------------------------------------------------------------------------------------


def make_prompt(model, seed: int = 0):
    """Token ids and 4 s log-mel: <bos> + 14 'system' tokens + 4 s audio + 8 more tokens."""
    g = torch.Generator().manual_seed(seed)
    wave = torch.randn(4 * 16000, generator=g) * 0.1
    features, _ = log_mel(wave, model.cfg.preprocessor)
    low, high = model.cfg.lfm.vocab_size // 4, model.cfg.lfm.vocab_size  # no special tokens
    before = torch.randint(low, high, (14,), generator=g).tolist()
    after = torch.randint(low, high, (8,), generator=g).tolist()
    return before, features, after


def new_conversation(m, prompt) -> Conversation:
    before, features, after = prompt
    conv = Conversation(m, tokenizer=None)
    conv.add_tokens(before)
    conv.add_features(features)
    conv.add_tokens(after)
    conv.role = "assistant"
    return conv


# ---- timings -----------------------------------------------------------------------------------


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitives, allocator, first-touch
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def paired_floor(frames, n_frames: int, frame_bytes: int, rounds: int) -> dict:
    """Frame steps timed right after a reading of the CPU's read bandwidth, round by round. On a
    shared machine the bandwidth moves by up to 1.5x from minute to minute, so a floor measured
    at other moments flatters or wrongs the frame time; each round's ratio uses its own
    reading. Medians of the rounds."""
    big = torch.ones(1 << 29, dtype=torch.bfloat16)  # 1 GiB, as memory_bandwidth_gbs
    big.sum()
    ratios, readings = [], []
    for _ in range(rounds):
        gbs = read_gbs(big, 2)
        step_s = _timed(frames) / n_frames
        readings.append(gbs)
        ratios.append(step_s * gbs * 1e9 / frame_bytes)
    return {"paired_bandwidth_gbs": statistics.median(readings), "paired_ratio_to_floor": statistics.median(ratios)}


@torch.inference_mode()
def measure(m, prompt, batch: int, n_text: int, n_frames: int, repeats: int, frame_bytes: int | None = None) -> dict:
    out = {}
    forced = forced_text(m.cfg)

    def prefill():
        new_conversation(m, prompt).prefill()

    out["prefill_s"] = best_of(prefill, repeats)
    out["encode_s"] = best_of(lambda: m.encode_audio([prompt[1]]), repeats)  # the conformer's part

    def ttfa():
        conv = new_conversation(m, prompt)
        for e in generate(conv, "interleaved", max_new_tokens=len(forced) + 1, force_tokens=forced):
            if e.kind == "audio":
                return
        raise RuntimeError("no audio frame")

    out["ttfa_s"] = best_of(ttfa, repeats)

    # Steady-state decode over `batch` rows that share the prompt.
    conv = new_conversation(m, prompt)
    emb = conv.pending_embeddings()
    capacity = emb.shape[0] + 2 * (n_text + n_frames) * (repeats + 2) + 8
    def start():
        cache = m.lfm.new_cache(batch, capacity)
        h = m.lfm(emb[None].expand(batch, -1, -1).contiguous(), cache)[:, -1]
        return cache, h

    cache, h = start()

    def text_steps():
        nonlocal h
        for _ in range(n_text):
            tok = m.text_logits(h).argmax(-1)
            h = m.lfm(m.lfm.embed_tokens(tok)[:, None], cache)[:, -1]

    def audio_steps():
        nonlocal h
        for _ in range(n_frames):
            frame = m.sample_frame(h)
            h = m.lfm(m.embed_audio_frames(frame)[:, None], cache)[:, -1]

    out["text_tok_s"] = batch * n_text / best_of(text_steps, repeats)
    out["audio_fps"] = batch * n_frames / best_of(audio_steps, repeats)
    out["frame_ms"] = 1000 * batch / out["audio_fps"]
    if frame_bytes is not None:
        out.update(paired_floor(audio_steps, n_frames, frame_bytes, repeats))

    def depth_frames(params=GREEDY):
        for _ in range(n_frames):
            m.sample_frame(h, params)

    # The frame's depthformer part, greedy and sampled as chat samples audio (temperature 1, top-k 4).
    out["depth_ms"] = 1000 * best_of(depth_frames, repeats) / n_frames
    out["depth_ms_sampled"] = 1000 * best_of(lambda: depth_frames(CHAT_AUDIO), repeats) / n_frames
    return out


@torch.inference_mode()
def sweep(m, prompt, batches, n_frames: int, repeats: int) -> dict:
    """{batch: ms per frame step (a depthformer frame and a backbone step for every row)}."""
    emb = new_conversation(m, prompt).pending_embeddings()
    capacity = emb.shape[0] + n_frames * (repeats + 2) + 8
    out = {}
    for batch in batches:
        cache = m.lfm.new_cache(batch, capacity)
        h = m.lfm(emb[None].expand(batch, -1, -1).contiguous(), cache)[:, -1]

        def frames():
            nonlocal h
            for _ in range(n_frames):
                frame = m.sample_frame(h)
                h = m.lfm(m.embed_audio_frames(frame)[:, None], cache)[:, -1]

        out[str(batch)] = 1000 * best_of(frames, repeats) / n_frames
        cache = h = None  # free the batch's cache before the next one is made
        gc.collect()
    return out


def realtime_streams(steps: dict) -> int:
    """The largest swept batch whose frame step beats the 80 ms of audio a frame holds."""
    return max([int(b) for b, ms in steps.items() if ms < 80.0], default=0)


@torch.inference_mode()
def parity(plain, fast, prompt, batch: int = 4, steps: int = 6) -> dict:
    """The fast path against the plain one on the same inputs: a batched prefill of the prompt
    and `steps` decode steps (cosine of the hidden states, the worst one), then greedy frames
    from the plain path's states (fraction of codes that agree)."""
    emb = new_conversation(plain, prompt).pending_embeddings()
    x = emb[None].expand(batch, -1, -1).contiguous()
    caches = [m.lfm.new_cache(batch, emb.shape[0] + 256) for m in (plain, fast)]  # room for a padded prefill
    g = torch.Generator().manual_seed(0)
    cosines = []
    for _ in range(steps + 1):
        want, got = (m.lfm(x, c)[:, -1].float() for m, c in zip((plain, fast), caches))
        cosines.append(float(torch.nn.functional.cosine_similarity(got, want, dim=-1).min()))
        x = (torch.randn(batch, 1, emb.shape[1], generator=g) * float(emb.float().std())).to(emb)
    h = want.to(emb.dtype)
    one_row = torch.cat([fast.sample_frame(h[i : i + 1]) == plain.sample_frame(h[i : i + 1]) for i in range(batch)])
    return {"hidden_cos_min": min(cosines), "frame_code_match": float((fast.sample_frame(h) == plain.sample_frame(h)).float().mean()),
            "frame_code_match_1row": float(one_row.float().mean())}


# ---- int8 quality ------------------------------------------------------------------------------


@torch.inference_mode()
def reference_run(m, prompt, steps: int):
    """Greedy interleaved schedule (n_text text steps, n_audio frames, ...) for `steps` steps
    without stopping: the inputs fed and, per text step, the logits."""
    n_text, n_audio = m.cfg.interleaved_n_text, m.cfg.interleaved_n_audio
    conv = new_conversation(m, prompt)
    h = conv.prefill()[None]
    cache = conv.cache
    record = []
    for i in range(steps):
        if i % (n_text + n_audio) < n_text:
            logits = m.text_logits(h)
            tok = logits.argmax(-1)
            record.append(("text", tok, logits.float()))
            x = m.lfm.embed_tokens(tok)
        else:
            frame = m.sample_frame(h)
            frame = torch.where(frame[:, :1] == END_OF_AUDIO, torch.full_like(frame, END_OF_AUDIO), frame)
            record.append(("audio", frame, None))
            x = m.embed_audio_frames(frame)
        h = m.lfm(x[:, None], cache)[:, -1]
    return record


@torch.inference_mode()
def replay_quality(mq, fast_q, prompt, record) -> dict:
    """Teacher-force the reference inputs through the quantized model and compare its greedy
    choices: text via its logits, audio codes via depth logits given the reference codes."""
    conv = new_conversation(fast_q, prompt)
    h = conv.prefill()[None]
    cache = conv.cache
    text_match, frame_match, n_frames, code_match, n_codes, cosines = 0, 0, 0, 0, 0, []
    for kind, target, ref_logits in record:
        if kind == "text":
            logits = fast_q.text_logits(h).float()
            cosines.append(float(torch.nn.functional.cosine_similarity(logits, ref_logits, dim=-1)[0]))
            text_match += int(logits.argmax(-1)[0] == target[0])
            x = fast_q.lfm.embed_tokens(target)
        else:
            depth = mq.depth_logits_teacher_forced(h, target).float()  # [1, K, 2049]
            depth[:, 1:, END_OF_AUDIO] = float("-inf")
            pred = depth.argmax(-1)
            if target[0, 0] == END_OF_AUDIO:  # the whole frame is end-of-audio: only code 0 counts
                pred, target = pred[:, :1], target[:, :1]
            same = pred == target
            code_match += int(same.sum())
            n_codes += same.numel()
            frame_match += int(same.all())
            n_frames += 1
            x = fast_q.embed_audio_frames(target)
        h = fast_q.lfm(x[:, None], cache)[:, -1]
    n_text = len(record) - n_frames
    return {
        # a step matches when its text token, or all 8 codes of its frame, match
        "quant_step_match": (text_match + frame_match) / len(record),
        # every sampled token counts: text tokens and each audio code
        "quant_token_match": (text_match + code_match) / max(n_text + n_codes, 1),
        "quant_text_match": text_match / max(n_text, 1),
        "quant_code_match": code_match / max(n_codes, 1),
        "quant_text_logit_cos_min": min(cosines) if cosines else None,
        "quant_text_logit_cos_mean": float(np.mean(cosines)) if cosines else None,
    }


# ---- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-official")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--quantize", default=None, choices=QUANT_MODES)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", default="1", help="a batch size, or a comma list for a sweep (the first one is "
                                                   "the batch of text_tok_s / audio_fps)")
    ap.add_argument("--graphs", default="auto", choices=["auto", "on", "off"], help="CUDA graph path of the fast engine")
    ap.add_argument("--compile", action="store_true", help="torch.compile the graph path's step functions")
    ap.add_argument("--triton", default="auto", choices=["auto", "on", "off"],
                    help="the graph path's one-row decode steps and frames through the fused Triton kernels")
    ap.add_argument("--threads", type=int, default=0, help="0: every core")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--text-tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prepack", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--exact", action="store_true", help="fast path bit-identical to plain (FastLFM2Audio exact=True)")
    ap.add_argument("--quality-steps", type=int, default=100)
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args(argv)
    batches = [int(b) for b in str(args.batch).split(",")]
    args.batch = batches[0]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    graphs = {"auto": None, "on": True, "off": False}[args.graphs]

    if args.threads:
        torch.set_num_threads(args.threads)
        threads = args.threads
    else:
        threads = use_all_cores()
    dtype = parse_dtype(args.dtype)
    prepack = {"auto": None, "on": True, "off": False}[args.prepack]

    t = time.perf_counter()
    if args.model == "random-official":
        model = random_official(dtype, device=device)
    else:
        model = LFM2AudioModel.from_pretrained(args.model, dtype=dtype, device=device)
    _sync()
    load_s = time.perf_counter() - t
    prompt = make_prompt(model)
    bandwidth = memory_bandwidth_gbs(device=device)
    # The prefill's bound: the cores' FMA peak where the CPU kernels can measure it (oneDNN's fp32
    # GEMM reaches ~60% of it on a 2-core AVX2 EPYC), else torch's matmul rate.
    fma = None if cuda else cpu_kernels.fma_gflops(threads)
    matmul = matmul_gflops(device)
    compute = max(matmul, fma or 0.0)
    result = {"model": args.model, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "dtype": args.dtype, "quantize": args.quantize, "exact": args.exact, "batch": args.batch,
              "threads": threads, "frames": args.frames, "text_tokens": args.text_tokens,
              "load_s": round(load_s, 2), "bandwidth_gbs": round(bandwidth, 1), "matmul_gflops": round(matmul, 1),
              "fma_peak_gflops": fma and round(fma, 1),
              "prefill_gflop": round(prefill_gflop(model, new_conversation(model, prompt).pending_embeddings().shape[0]), 1)}
    do_sweep = len(batches) > 1 or cuda
    timing = {"batch": args.batch, "n_text": args.text_tokens, "n_frames": args.frames, "repeats": args.repeats}

    parts = {"plain": weight_bytes(model)}
    plain_bytes = frame_bytes(parts["plain"])
    if not args.skip_plain:
        result["plain"] = measure(model, prompt, **timing, frame_bytes=None if cuda else plain_bytes)
        result["plain"]["frame_bytes_gb"] = plain_bytes / 1e9
        if do_sweep:
            result["plain"]["sweep"] = sweep(model, prompt, batches, args.frames, args.repeats)

    record = None
    if args.quantize:
        ref = FastLFM2Audio(model, exact=True, threads=0)  # bit-identical to the plain path
        record = reference_run(ref, prompt, args.quality_steps)
        del ref
        gc.collect()
        t = time.perf_counter()
        fast_model = quantize_model(copy.deepcopy(model), args.quantize)
        result["quantize_s"] = round(time.perf_counter() - t, 2)
        if args.skip_plain:
            del model
            gc.collect()
    else:
        fast_model = model
    t = time.perf_counter()
    fused = {"auto": None, "on": True, "off": False}[args.triton]
    fast = FastLFM2Audio(fast_model, prepack=prepack, exact=args.exact, threads=0, cuda_graphs=graphs, compile=args.compile,
                         triton=fused)
    result["engine_build_s"] = round(time.perf_counter() - t, 2)
    result["cuda_graphs"] = fast.cuda_graphs
    result["compiled"] = fast.cuda_graphs and fast.lfm.kernels.compiled
    result["triton"] = fast.cuda_graphs and fast.depth.fused is not None
    result["pdl"] = result["triton"] and fast.depth.fused.uses_pdl(torch.device(args.device))
    # decode steps that run as one model/cpu_kernels call (CPU without oneDNN's bf16, or int8)
    result["cpu_kernel_steps"] = [name for name, part in (("backbone", fast.lfm), ("depth", fast.depth))
                                  if getattr(part, "cpu_step", None) is not None]
    t = time.perf_counter()
    parts["fast"] = weight_bytes(fast)
    fast_bytes = frame_bytes(parts["fast"])
    result["fast"] = measure(fast, prompt, **timing, frame_bytes=None if cuda else fast_bytes)
    result["fast"]["frame_bytes_gb"] = fast_bytes / 1e9
    if do_sweep:
        result["fast"]["sweep"] = sweep(fast, prompt, batches, args.frames, args.repeats)
    result["fast_bench_s"] = round(time.perf_counter() - t, 1)  # graph captures and compiles included
    if fast.cuda_graphs:  # a compile failure falls back to the uncompiled functions
        result["compiled"] = fast.lfm.kernels.compiled
    if record is not None:
        result.update(replay_quality(fast_model, fast, prompt, record))
    elif fast_model is model:
        result["fast"]["parity"] = parity(model, fast, prompt)

    # Measured again at the end (the machine is shared; the higher figure is the machine's).
    bandwidth = max(bandwidth, memory_bandwidth_gbs(device=device))
    if fma:
        fma = max(fma, cpu_kernels.fma_gflops(threads))
        compute = max(compute, fma)
        result["fma_peak_gflops"] = fma
    result["bandwidth_gbs"] = round(bandwidth, 1)
    for name in ("plain", "fast"):
        if name not in result:
            continue
        r = result[name]
        floor_fps = bandwidth * 1e9 / (r["frame_bytes_gb"] * 1e9)
        r["floor_fps"] = floor_fps
        r["floor_ms"] = 1000 / floor_fps
        r["ratio_to_floor"] = floor_fps / (r["audio_fps"] / args.batch)
        r["ttfa_floor_s"] = ttfa_floor_s(parts[name], fast.cfg.interleaved_n_text, result["prefill_gflop"], compute,
                                         bandwidth)
        r["ttfa_ratio_to_floor"] = r["ttfa_s"] / r["ttfa_floor_s"]
        if "sweep" in r:
            r["realtime_streams"] = realtime_streams(r["sweep"])
    if "plain" in result:
        result["speedup"] = {k: result["fast"][k] / result["plain"][k] for k in ("text_tok_s", "audio_fps")}
        result["speedup"].update({k: result["plain"][k] / result["fast"][k] for k in ("prefill_s", "ttfa_s", "frame_ms")})
        if do_sweep:
            result["speedup"]["sweep"] = {b: result["plain"]["sweep"][b] / ms for b, ms in result["fast"]["sweep"].items()}
    result["peak_rss_gb"] = peak_rss_gb()
    result["gpu_peak_gb"] = gpu_peak_gb()
    print(json.dumps(_rounded(result)))
    return 0


def _rounded(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


if __name__ == "__main__":
    sys.exit(main())

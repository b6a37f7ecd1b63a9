"""`lfm2-audio`: transcribe, speak, chat, train and make checkpoints from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .config import QUANT_MODES, VOCODERS, WORKERS
from .errors import InputError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled demo model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: as stored)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    _engine_args(p)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=None)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("fast", "plain"), default="fast",
                   help="fast: fused decode path (same greedy tokens); plain: the eager reference-style model")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None,
                   help="int8: weight-only int8 decode matmuls (CPU, bf16 models); int8-dyn: int8 activations too; "
                        "int4: 4-bit weights in groups of 32 (CPU; fastest decode, lossy: see the README)")


def _sampling_args(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--temperature", type=float, default=None,
                   help=f"audio sampling temperature (0 = greedy; default: the model's own for {task}, "
                        f"else the reference's: TTS 0.8, chat 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="default: the model's own, else TTS 64, chat 4")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--text-temperature", type=float, default=0.0)


def _audio_sampling(args, lfm, task: str):
    """The sampling the flags ask for; a flag not given keeps the model's default for the task."""
    return lfm.audio_sampling[task].overridden(args.temperature, args.top_k, args.top_p)


def _load(args):
    import torch

    from .pipeline import LFM2Audio

    if args.threads:
        torch.set_num_threads(args.threads)
    return LFM2Audio.from_pretrained(args.model, dtype=args.dtype, device=args.device, fast=args.engine == "fast",
                                     threads=args.threads, quantize=args.quantize)


def _write_audio(reply, out: Path) -> str:
    from .audio.io import save_wav

    if reply.audio is not None:
        save_wav(out, reply.audio, reply.sample_rate)
        return f"{out} ({len(reply.audio) / reply.sample_rate:.2f} s)"
    codes = out.with_suffix(".codes.npy")
    np.save(codes, reply.frames.numpy())
    return f"{codes} ({reply.frames.shape[0]} frames of codes; this checkpoint has no codec)"


def cmd_asr(args) -> int:
    lfm = _load(args)
    for f in args.files:
        text = lfm.transcribe(f, max_new_tokens=args.max_new_tokens, beam=args.beam, ctc_weight=args.ctc_weight)
        print(text if len(args.files) == 1 else f"{f}\t{text}")
    return 0


def cmd_tts(args) -> int:
    lfm = _load(args)
    reply = lfm.speak(args.text, voice=args.voice, max_new_tokens=args.max_new_tokens, seed=args.seed,
                      audio_sampling=_audio_sampling(args, lfm, "tts"))
    print("wrote", _write_audio(reply, Path(args.output)))
    return 0


def cmd_chat(args) -> int:
    """Each input is one user turn: an existing audio file is heard, anything else is read."""
    from .generation.sampling import Sampling

    lfm = _load(args)
    conv = lfm.chat(system=args.system)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = iter(args.inputs) if args.inputs else _stdin_turns()
    audio_sampling = _audio_sampling(args, lfm, "chat")
    text_sampling = Sampling(args.text_temperature)
    for turn, item in enumerate(inputs, 1):
        content = item if not Path(item).is_file() else Path(item)
        print(f"user: {item}", flush=True)
        print("assistant: ", end="", flush=True)
        chunks, frames = [], 0
        try:
            for e in lfm.respond(conv, content,
                                 mode=args.mode, audio_sampling=audio_sampling, text_sampling=text_sampling,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed):
                if e.kind == "text":
                    print(e.text, end="", flush=True)
                elif e.kind == "audio" and e.audio is not None:
                    chunks.append(e.audio)
                if e.kind == "audio" and e.frame is not None and not e.is_end_of_audio:
                    frames += 1
        except InputError as err:
            print(f"\nerror: {err}", file=sys.stderr)
            continue
        print()
        if chunks:
            from .audio.io import save_wav

            path = out_dir / f"reply_{turn}.wav"
            save_wav(path, np.concatenate(chunks), lfm.codec.sample_rate)
            print(f"[audio: {path}, {frames} frames]")
        else:
            print(f"[audio: {frames} frames, no codec to decode them]")
    return 0


def _stdin_turns():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def cmd_init_random(args) -> int:
    import json
    import shutil

    import torch

    from .config import LFM2AudioConfig, official_config
    from .model.lfm2_audio import parse_dtype, random_model

    if args.config:
        cfg = LFM2AudioConfig.from_json(args.config)
    elif args.size == "official":
        cfg = official_config()
    else:
        cfg = LFM2AudioConfig.from_dict(json.loads(TINY_CONFIG))
    model = random_model(cfg, dtype=parse_dtype(args.dtype) or torch.float32, seed=args.seed)
    model.save_pretrained(args.out)
    if args.tokenizer:
        shutil.copy(args.tokenizer, Path(args.out) / "tokenizer.json")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n:,} parameters")
    return 0


TINY_CONFIG = """{
  "codebooks": 8, "interleaved_n_text": 6, "interleaved_n_audio": 12,
  "encoder": {"n_layers": 2, "d_model": 64, "subsampling_conv_channels": 32, "n_heads": 4},
  "lfm": {"vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 192, "block_multiple_of": 32,
          "layer_types": ["conv", "full_attention", "conv", "full_attention"]},
  "depthformer": {"layers": 2, "dim": 128, "tie": true}
}"""


def cmd_serve(args) -> int:
    from .serving.server import serve

    return serve(args)


def cmd_demo(args) -> int:
    from .serving.gradio_app import main as demo_main

    return demo_main(args)


def _serve_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled demo model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: as stored)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=port, help="0 picks a free port")
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent conversations (cache rows)")
    p.add_argument("--max-context", type=int, default=4096, help="positions per conversation")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="default reply length (tokens + frames)")
    p.add_argument("--vocoder", default=None, choices=VOCODERS,
                   help="demo model's mel codec only: griffin-lim costs ~10x less CPU per second of speech, "
                        "sounds rougher (default: hifigan)")
    p.add_argument("--codec-worker", default="auto", choices=list(WORKERS),
                   help="where audio is decoded: a child process (auto: when the codec is on the CPU) "
                        "keeps it from slowing the engine; a thread shares the engine's process")
    p.add_argument("--engine-worker", default="auto", choices=list(WORKERS),
                   help="where the model runs: a child process (auto: when the model is on the CPU) keeps "
                        "the web server's Python from stalling its steps; a thread shares the server's process")
    _engine_args(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lfm2-audio", description="LFM2-Audio: audio and text in, audio and text out.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("asr", help="transcribe audio files")
    p.add_argument("files", nargs="+")
    p.add_argument("--beam", type=int, default=None,
                   help="beam width (default: the model's own, config.json asr_decoding, else 1: greedy)")
    p.add_argument("--ctc-weight", type=float, default=None,
                   help="score the beam with the model's CTC head too, this much (0-1; default: the model's own, "
                        "else 0; only for models trained with the auxiliary CTC loss, like the demo model)")
    _model_args(p)
    p.set_defaults(func=cmd_asr)

    p = sub.add_parser("tts", help="speak a text")
    p.add_argument("text")
    p.add_argument("-o", "--output", default="speech.wav")
    p.add_argument("--voice", default="us-female", choices=["us-male", "us-female", "uk-male", "uk-female"])
    _model_args(p)
    _sampling_args(p, "tts")
    p.set_defaults(func=cmd_tts)

    p = sub.add_parser("chat", help="multi-turn chat: audio files or text in, text and speech out")
    p.add_argument("inputs", nargs="*", help="turns (audio file paths or text); stdin lines if none")
    p.add_argument("--system", default="Respond with interleaved text and audio.")
    p.add_argument("--mode", default="interleaved", choices=["interleaved", "sequential"])
    p.add_argument("--out-dir", default=".")
    _model_args(p)
    _sampling_args(p, "chat")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve the model: OpenAI-style HTTP API, realtime WebSocket, web page")
    _serve_args(p, 8000)
    p.add_argument("--queue-timeout", type=float, default=10.0, help="seconds a request may wait for a free session")
    p.add_argument("--max-upload-mb", type=float, default=25.0)
    p.add_argument("--vad", default="auto", choices=["auto", "silero", "energy"], help="voice activity detector")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds replies may take to finish on shutdown")
    p.add_argument("--model-name", default="lfm2-audio", help="model id reported by the API")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="a Gradio app on the serving engine (needs the 'demo' extra)")
    _serve_args(p, 7860)
    p.set_defaults(func=cmd_demo)

    sub.add_parser("train", help="train or fine-tune: lfm2-audio train CONFIG [key=value ...]")

    sub.add_parser("pretrain-encoder", help="CTC-train the audio encoder alone: lfm2-audio pretrain-encoder CONFIG")
    sub.add_parser("precompute", help="map conversations (JSONL) to training samples: lfm2-audio precompute --help")
    sub.add_parser("eval", help="score a model on the held-out synthetic sets: lfm2-audio eval --help")

    p = sub.add_parser("init-random", help="write a checkpoint with random weights (tests, benchmarks)")
    p.add_argument("out")
    p.add_argument("--size", default="tiny", choices=["tiny", "official"])
    p.add_argument("--config", default=None, help="a config.json to use instead of --size")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to copy into the checkpoint")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_random)
    return ap


# Subcommands whose own parsers take the rest of the command line as it is.
PASSTHROUGH = {"train": "lfm2_audio.training.trainer", "pretrain-encoder": "lfm2_audio.training.encoder_ctc",
               "precompute": "lfm2_audio.training.data",
               "eval": "lfm2_audio.evaluation"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        try:
            return importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:])
        except InputError as e:
            print(f"lfm2-audio: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"lfm2-audio: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The Python API: load a checkpoint once, then transcribe, speak and chat.

    from lfm2_audio import LFM2Audio
    lfm = LFM2Audio.from_pretrained("LiquidAI/LFM2-Audio-1.5B")   # or a local directory
    print(lfm.transcribe("question.wav"))
    wave = lfm.speak("Hello there.", voice="uk-female")           # 24 kHz float32
    chat = lfm.chat()
    for event in lfm.respond(chat, "question.wav"):               # streamed text + audio
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .audio.io import load_audio
from .codec import load_codec
from .errors import InputError
from .generation.beam import asr_decoding_default, beam_transcript
from .generation.chat import SYSTEM_PROMPTS, VOICES, Conversation, transcript_token_cap
from .generation.generate import Event, generate
from .generation.sampling import GREEDY, Sampling, audio_sampling_defaults
from .model.lfm2_audio import LFM2AudioModel, parse_device, resolve_checkpoint
from .processor import Tokenizer

DEMO_MODEL = Path(__file__).parent / "assets" / "demo-model"


def default_model() -> Path:
    if (DEMO_MODEL / "config.json").exists():
        return DEMO_MODEL
    raise InputError(
        "no model given and the bundled demo model is not installed: pass --model "
        "with a checkpoint directory or a hub id (e.g. LiquidAI/LFM2-Audio-1.5B)"
    )


@dataclass
class Reply:
    """A finished response: its text, its audio frames and (when a codec is loaded) its audio."""

    text: str
    frames: torch.Tensor  # [n, K], end-of-audio frame removed
    audio: np.ndarray | None  # float32 at `sample_rate`
    sample_rate: int | None
    reason: str


class LFM2Audio:
    def __init__(self, model: LFM2AudioModel, tokenizer: Tokenizer, codec=None):
        self.model, self.tokenizer, self.codec = model, tokenizer, codec
        # what respond ("chat") and speak ("tts") sample audio with unless told otherwise
        self.audio_sampling = audio_sampling_defaults(model.cfg.extra)
        self.asr_decoding = asr_decoding_default(model.cfg.extra)  # what transcribe decodes with

    @classmethod
    def from_pretrained(cls, path_or_id=None, dtype=None, device="cpu", codec: bool = True, fast: bool = True,
                        threads: int | None = None, vocoder: str | None = None, **model_kwargs) -> "LFM2Audio":
        """fast: decode with generation/fast.py (fused frame, prepacked weights; CUDA graphs on a
        GPU), which gives the plain path's greedy tokens; False keeps the plain eager model.
        vocoder: for the demo model's mel codec, "hifigan" (its own) or "griffin-lim" (cheaper).
        model_kwargs go to LFM2AudioModel.from_pretrained (e.g. quantize="int8")."""
        directory = resolve_checkpoint(path_or_id) if path_or_id is not None else default_model()
        device = parse_device(device)
        model = LFM2AudioModel.from_pretrained(directory, dtype=dtype, device=device, **model_kwargs)
        if fast:
            from .generation.fast import FastLFM2Audio

            model = FastLFM2Audio(model, threads=threads)
        tokenizer = Tokenizer.from_pretrained(directory)
        audio_codec = None
        if codec:
            try:
                audio_codec = load_codec(directory, device=device, vocoder=vocoder)
            except InputError:
                if vocoder is not None:
                    raise  # asked for explicitly: say why it cannot be had
                audio_codec = None  # text and codes still work; audio needs a codec
        return cls(model, tokenizer, audio_codec)

    # ---- conversations ----------------------------------------------------------------------

    def chat(self, system: str | None = SYSTEM_PROMPTS["chat"], max_context: int | None = None) -> Conversation:
        return Conversation(self.model, self.tokenizer, system=system, max_context=max_context)

    def respond(self, conv: Conversation, *user_contents, mode: str = "interleaved",
                text_sampling: Sampling = GREEDY, audio_sampling: Sampling | None = None,
                max_new_tokens: int = 1024, seed: int | None = None, sample_rate: int | None = None,
                force_tokens: tuple[int, ...] = (), force_frames: torch.Tensor | None = None) -> Iterator[Event]:
        """Add a user turn (strings are text; paths, bytes, files and arrays are audio) and
        stream the reply.

        Audio events carry `audio` (float32 samples at the codec's rate) as soon as each frame
        is decoded, when a codec is loaded. audio_sampling: by default the model's own for chat
        (`self.audio_sampling`)."""
        audio_sampling = audio_sampling or self.audio_sampling["chat"]
        if user_contents:
            conv.turn("user", *user_contents, sample_rate=sample_rate)
        stream = self.codec.stream(1) if self.codec is not None else None
        for event in generate(conv, mode, text_sampling, audio_sampling, max_new_tokens, seed, force_tokens,
                              force_frames=force_frames):
            if event.kind == "audio" and stream is not None and not event.is_end_of_audio:
                event.audio = stream.decode(event.frame.view(1, -1, 1).cpu())[0].numpy()
            elif event.kind == "end" and stream is not None and hasattr(stream, "flush"):
                tail = stream.flush()
                if tail is not None and tail.numel():
                    yield Event("audio", audio=tail[0].numpy())
            yield event

    def complete(self, conv: Conversation, *user_contents, **kwargs) -> Reply:
        """`respond`, gathered into one Reply."""
        text, frames, chunks, reason = [], [], [], None
        for e in self.respond(conv, *user_contents, **kwargs):
            if e.kind == "text":
                text.append(e.text)
            elif e.kind == "audio":
                if e.frame is not None and not e.is_end_of_audio:
                    frames.append(e.frame)
                if e.audio is not None:
                    chunks.append(e.audio)
            else:
                reason = e.reason
        K = self.model.cfg.codebooks
        audio = np.concatenate(chunks).astype(np.float32) if chunks else None
        return Reply(
            text="".join(text).strip(),
            frames=torch.stack(frames) if frames else torch.zeros(0, K, dtype=torch.long),
            audio=audio,
            sample_rate=self.codec.sample_rate if self.codec is not None else None,
            reason=reason,
        )

    # ---- one-shot tasks ---------------------------------------------------------------------

    def transcribe(self, audio, sample_rate: int | None = None, max_new_tokens: int = 512,
                   beam: int | None = None, ctc_weight: float | None = None) -> str:
        """Audio (a path, bytes, file object, or array with sample_rate) -> its transcript.

        beam, ctc_weight: beam search, scored jointly with the model's CTC head when ctc_weight
        > 0 (generation/beam.py); None keeps the model's own setting (`self.asr_decoding`)."""
        decoding = self.asr_decoding.overridden(beam, ctc_weight)
        if isinstance(audio, str):
            audio = Path(audio)  # a string here is a file name, never text to read
        rate = self.model.cfg.preprocessor.sample_rate
        wave = load_audio(audio, sample_rate, target_rate=rate)
        max_new_tokens = min(max_new_tokens, transcript_token_cap(len(wave) / rate))
        conv = self.chat(system=SYSTEM_PROMPTS["asr"])
        if decoding.greedy:
            reply = self.complete(conv, wave, mode="sequential", audio_sampling=GREEDY,
                                  max_new_tokens=max_new_tokens, sample_rate=rate)
            return reply.text
        conv.turn("user", wave, sample_rate=rate)
        conv.new_turn("assistant")
        ids = beam_transcript(conv, decoding, max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def speak(self, text: str, voice: str = "us-female", audio_sampling: Sampling | None = None,
              max_new_tokens: int = 1024, seed: int | None = None) -> Reply:
        if voice not in VOICES:
            raise InputError(f"voice must be one of {', '.join(VOICES)}; got {voice!r}")
        if not isinstance(text, str) or not text.strip():
            raise InputError("text to speak must be a non-empty string")
        conv = self.chat(system=SYSTEM_PROMPTS[f"tts-{voice}"])
        # Speech is the whole answer: start it at once rather than hoping the model opens with
        # <|audio_start|> (it does when trained; forcing it costs nothing and never fails).
        return self.complete(conv, text, mode="sequential",
                             audio_sampling=audio_sampling or self.audio_sampling["tts"], max_new_tokens=max_new_tokens, seed=seed,
                             force_tokens=(self.tokenizer.audio_start_id,))


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)

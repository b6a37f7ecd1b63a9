"""Conversation state: the official prompt format, with the backbone cache kept across turns.

A conversation is one sequence of positions (text tokens, encoded input-audio vectors and
output-audio frames). Pieces are queued as they are added and only the new positions are run
through the backbone when the model next has to speak; the reference re-encodes the whole
history every turn instead. Text is tokenised piece by piece, exactly as the reference does,
so token ids match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..audio.features import user_features
from ..audio.io import load_audio
from ..config import MODALITY_AUDIO_IN, MODALITY_AUDIO_OUT, MODALITY_TEXT
from ..errors import InputError
from ..processor import Tokenizer

SYSTEM_PROMPTS = {
    "asr": "Perform ASR.",
    "chat": "Respond with interleaved text and audio.",
    "tts-us-male": "Perform TTS. Use the US male voice.",
    "tts-us-female": "Perform TTS. Use the US female voice.",
    "tts-uk-male": "Perform TTS. Use the UK male voice.",
    "tts-uk-female": "Perform TTS. Use the UK female voice.",
}
VOICES = ("us-male", "us-female", "uk-male", "uk-female")
# Nobody speaks 10 tokens a second: a longer transcript is a decoding loop, not speech.
MAX_TRANSCRIPT_TOKENS_PER_S = 10


def transcript_token_cap(seconds: float) -> int:
    """Most tokens a transcript of `seconds` of audio may take before ASR decoding is cut off."""
    return int(MAX_TRANSCRIPT_TOKENS_PER_S * seconds) + 16


DEFAULT_MAX_CONTEXT = 32768
INITIAL_CAPACITY = 1024


@dataclass
class Piece:
    modality: int
    value: torch.Tensor  # text ids [n] | log-mel [n_mels, T] | audio frames [n, K]
    positions: int


@dataclass
class Record:
    """Everything the conversation holds, in order (for inspection, transcripts and training)."""

    modality: list[int] = field(default_factory=list)
    text: list[int] = field(default_factory=list)
    audio_in: list[torch.Tensor] = field(default_factory=list)
    audio_out: list[torch.Tensor] = field(default_factory=list)


class Conversation:
    def __init__(self, model, tokenizer: Tokenizer, system: str | None = None, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        limit = model.cfg.max_context
        self.max_context = min(max_context or DEFAULT_MAX_CONTEXT, limit)
        self.pending: list[Piece] = []
        self.record = Record()
        self.cache = None
        self.length = 0  # positions queued or run, the whole history
        self.role: str | None = None
        self.add_tokens([tokenizer.bos_id if tokenizer is not None else model.cfg.lfm.bos_token_id])
        if system is not None:
            self.turn("system", system)

    # ---- building the prompt ----------------------------------------------------------------

    def add_text(self, text: str) -> None:
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        if self.tokenizer is None:
            raise InputError("this conversation has no tokenizer: add token ids with add_tokens()")
        self.add_tokens(self.tokenizer.encode(text))

    def add_tokens(self, ids, fed: bool = False) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        vocab = self.model.cfg.lfm.vocab_size
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(f"token ids must be in [0, {vocab - 1}]")
        self._queue(Piece(MODALITY_TEXT, ids, ids.numel()), fed)
        self.record.text += ids.tolist()

    def add_audio(self, audio, sample_rate: int | None = None) -> None:
        """A path, bytes, file object or array (then give sample_rate) of any rate and channels."""
        pre = self.model.cfg.preprocessor
        wave = load_audio(audio, sample_rate=sample_rate, target_rate=pre.sample_rate)
        self.add_features(user_features(wave, pre))

    def add_features(self, features: torch.Tensor) -> None:
        n = self.model.audio_positions(features.shape[-1])
        self._queue(Piece(MODALITY_AUDIO_IN, features, n))
        self.record.audio_in.append(features)

    def add_audio_frames(self, frames: torch.Tensor, fed: bool = False) -> None:
        """Output-audio frames [n, K] (codes in [0, 2048]) as the assistant's speech."""
        frames = torch.as_tensor(frames, dtype=torch.long).reshape(-1, self.model.cfg.codebooks)
        if frames.numel() and (frames.min() < 0 or frames.max() > 2048):
            raise InputError("audio-out codes must be in [0, 2048]")
        self._queue(Piece(MODALITY_AUDIO_OUT, frames, frames.shape[0]), fed)
        self.record.audio_out.append(frames)

    def new_turn(self, role: str) -> None:
        if role not in ("system", "user", "assistant"):
            raise InputError(f"role must be system, user or assistant, got {role!r}")
        self.add_text(f"<|im_start|>{role}\n")
        self.role = role

    def end_turn(self) -> None:
        self.add_text("<|im_end|>\n")
        self.role = None

    def turn(self, role: str, *contents, sample_rate: int | None = None) -> None:
        """A whole turn: strings are text; anything else (a Path, bytes, file, array) is audio."""
        self.new_turn(role)
        for c in contents:
            if isinstance(c, str):
                self.add_text(c)
            else:
                self.add_audio(c, sample_rate=sample_rate)
        self.end_turn()

    def _queue(self, piece: Piece, fed: bool = False) -> None:
        """Account for a piece; `fed` pieces were already run through the backbone (generated
        output fed back step by step), the others wait in the queue."""
        if self.length + piece.positions > self.max_context:
            raise InputError(
                f"conversation would reach {self.length + piece.positions} positions, over the "
                f"context limit of {self.max_context}"
            )
        if not fed:
            self.pending.append(piece)
        self.length += piece.positions
        self.record.modality += [piece.modality] * piece.positions

    # ---- running the backbone ---------------------------------------------------------------

    def pending_embeddings(self) -> torch.Tensor:
        """Embeddings [n, D] of everything queued, in order; clears the queue."""
        return embed_pending([self])[0]

    @torch.inference_mode()
    def run(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Feed [n, D] new positions through the backbone; returns their hidden states [n, D]."""
        n = embeddings.shape[0]
        self._reserve(n)
        return self.model.lfm(embeddings[None], self.cache)[0]

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Run everything queued; returns the last hidden state [D]."""
        if not self.pending:
            raise InputError("nothing new to respond to: add a user turn first")
        return self.run(self.pending_embeddings())[-1]

    def _reserve(self, n: int) -> None:
        used = 0 if self.cache is None else self.cache.max_len
        need = used + n
        if need > self.max_context:
            raise InputError(f"context limit of {self.max_context} positions reached")
        if self.cache is not None and need <= self.cache.capacity:
            return
        capacity = INITIAL_CAPACITY
        while capacity < need:
            capacity *= 2
        capacity = min(capacity, self.max_context)
        fresh = self.model.lfm.new_cache(1, capacity)
        if self.cache is not None:  # grow geometrically: rare, amortised copies
            fresh.load(self.cache)
        self.cache = fresh

    def transcript(self) -> str:
        return self.tokenizer.decode(self.record.text)


@torch.inference_mode()
def embed_pending(convs: list[Conversation], encoded: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`pending_embeddings` of several conversations on one model, every queued audio clip
    through the encoder in one batch: when many users end their turns at once, one padded
    encoder call costs a fraction of one call per clip. `encoded`: the clips' adapter vectors
    when the caller has them already. Clears each queue."""
    m = convs[0].model
    if encoded is None:
        clips = [p.value for c in convs for p in c.pending if p.modality == MODALITY_AUDIO_IN]
        encoded = m.encode_audio(clips) if clips else None
    out, offset = [], 0
    for c in convs:
        parts = []
        for p in c.pending:
            if p.modality == MODALITY_TEXT:
                parts.append(m.lfm.embed_tokens(p.value.to(m.device)))
            elif p.modality == MODALITY_AUDIO_IN:
                parts.append(encoded[offset : offset + p.positions])
                offset += p.positions
            else:
                parts.append(m.embed_audio_frames(p.value.to(m.device)))
        c.pending = []
        out.append(torch.cat(parts) if parts else torch.zeros(0, m.cfg.lfm.hidden_size, dtype=m.dtype, device=m.device))
    return out

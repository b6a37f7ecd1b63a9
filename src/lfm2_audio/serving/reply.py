"""One assistant reply as a state machine: `generate()`'s loop cut into steps.

`generation.generate.generate` runs a whole reply for one conversation: sample (text head or
depthformer), switch modality, feed the item back through the backbone, repeat. The engine
runs many replies at once and batches each of those three phases across them, so it needs the
loop's body with the model calls taken out. `ReplyMachine` is that body: the engine samples
for it (`wants_audio` says which head; `forced_token` pre-empts sampling) and hands the
result to `take_token` / `take_frame`; `feed_input` does the bookkeeping before the backbone
step; `after_step` after it. The switching rules, the records made in the conversation and
the events are exactly generate()'s, which the tests check by comparing the two event for
event.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import END_OF_AUDIO, MODALITY_AUDIO_OUT, MODALITY_TEXT
from ..errors import InputError
from ..generation.beam import AsrDecoding
from ..generation.chat import Conversation
from ..generation.generate import Event, _special_ids
from ..generation.sampling import GREEDY, Sampling


@dataclass(frozen=True)
class ReplyParams:
    """How to generate one reply. `stop_at_audio` (a serving extension) ends a sequential reply
    at <|audio_start|> or <|text_end|>: text-only answers and transcription never pay for
    audio frames."""

    mode: str = "interleaved"
    text_sampling: Sampling = GREEDY
    audio_sampling: Sampling = GREEDY
    max_new_tokens: int = 1024
    seed: int | None = None
    force_tokens: tuple[int, ...] = ()
    stop_at_audio: bool = False
    # A transcript by beam search (generation/beam.py) instead of a reply step by step: it comes
    # whole, as one text event, when the search ends. None, or greedy settings: step by step.
    asr_decoding: AsrDecoding | None = None

    def __post_init__(self):
        if self.mode not in ("interleaved", "sequential"):
            raise InputError(f"mode must be 'interleaved' or 'sequential', got {self.mode!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.text_sampling, Sampling) or not isinstance(self.audio_sampling, Sampling):
            raise InputError("text_sampling and audio_sampling must be Sampling instances")
        if self.asr_decoding is not None and not isinstance(self.asr_decoding, AsrDecoding):
            raise InputError("asr_decoding must be an AsrDecoding instance")

    @property
    def searched(self) -> bool:
        """Whether the reply is a beam-searched transcript rather than generated step by step."""
        return self.asr_decoding is not None and not self.asr_decoding.greedy


class ReplyMachine:
    """The state of one reply between steps. Used on the engine thread only."""

    def __init__(self, conv: Conversation, params: ReplyParams):
        self.conv, self.params = conv, params
        model = conv.model
        self.ids = _special_ids(conv)
        self.n_text, self.n_audio = model.cfg.interleaved_n_text, model.cfg.interleaved_n_audio
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=model.device).manual_seed(int(params.seed))
        self.text_stream = conv.tokenizer.stream(skip_special_tokens=True) if conv.tokenizer is not None else None
        # Checkpoints pad the embedding table past the tokenizer's vocabulary; a sampled id in
        # the padding has no text (generate() would raise on it mid-reply).
        self.text_vocab = conv.tokenizer.vocab_size if conv.tokenizer is not None else None
        self.forced = list(params.force_tokens)
        self.audio = False
        self.left, self.text_done = self.n_text, False
        self.last = None  # the item sampled last, not yet fed back (generate's `last`)
        self.reason = "max_new_tokens"
        self.steps = 0  # iterations of generate's loop begun
        self.finished = False
        self.h: torch.Tensor | None = None  # the backbone state the next sample reads [D]
        self.next_input = None  # (MODALITY_TEXT, token) | (MODALITY_AUDIO_OUT, frame) to feed
        self.frames = 0  # audio frames produced (end-of-audio excluded)
        self.tokens = 0  # text tokens produced

    def open_turn(self) -> None:
        """Queue the assistant header, as generate() does before its prefill."""
        if self.conv.role != "assistant":
            self.conv.new_turn("assistant")

    # ---- one step ---------------------------------------------------------------------------

    @property
    def wants_audio(self) -> bool:
        return self.audio

    @property
    def sampling(self) -> Sampling:
        return self.params.audio_sampling if self.audio else self.params.text_sampling

    def forced_token(self) -> int | None:
        """A token from force_tokens replaces the next text sample (and draws no randomness)."""
        return self.forced.pop(0) if self.forced and not self.audio else None

    def take_token(self, tok: int) -> list[Event]:
        self._begin_step()
        ids, mode = self.ids, self.params.mode
        self.last = (MODALITY_TEXT, tok)
        if tok == ids["im_end"]:
            events = [Event("text", token=tok, text="")] if mode == "sequential" else []
            return events + self.finish("end_of_turn")
        if self.params.stop_at_audio and mode == "sequential" and tok in (ids["audio_start"], ids["text_end"]):
            return self.finish("end_of_turn")
        self.tokens += 1
        piece = ""
        if self.text_stream is not None and tok < self.text_vocab:
            piece = self.text_stream.put(tok)
        events = [Event("text", token=tok, text=piece)]
        if mode == "sequential":
            self.audio = tok == ids["audio_start"]
        else:
            self.text_done = self.text_done or tok == ids["text_end"]
            if self.left == 0 or self.text_done:
                self.audio, self.left = True, self.n_audio
        self.next_input = (MODALITY_TEXT, tok)
        return events

    def take_frame(self, frame: torch.Tensor) -> list[Event]:
        self._begin_step()
        if frame[0] == END_OF_AUDIO:  # codebook 0 alone decides; the whole frame ends
            frame = torch.full_like(frame, END_OF_AUDIO)
        else:
            self.frames += 1
        self.last = (MODALITY_AUDIO_OUT, frame)
        if self.params.mode == "interleaved" and self.left == 0 and not self.text_done:
            self.audio, self.left = False, self.n_text
        if frame[0] == END_OF_AUDIO:
            self.audio = False
        self.next_input = (MODALITY_AUDIO_OUT, frame)
        return [Event("audio", frame=frame)]

    def feed_input(self) -> list[Event]:
        """Before the backbone step: stop at the context limit, else record the item as fed.
        Returns the end events when the reply stops here."""
        if self.conv.length + 1 > self.conv.max_context:
            self.next_input = None
            return self.finish("context_limit")
        self._record(self.last, fed=True)
        self.last = None
        return []

    def after_step(self, h: torch.Tensor) -> list[Event]:
        """After the backbone step: keep its state; the loop ends after max_new_tokens steps."""
        self.h, self.next_input = h, None
        if self.steps >= self.params.max_new_tokens:
            return self.finish("max_new_tokens")
        return []

    def finish(self, reason: str) -> list[Event]:
        """Close the reply the way generate() does after its loop (also used to cancel)."""
        if self.finished:
            return []
        self.finished, self.reason, self.next_input = True, reason, None
        if self.last is not None and reason == "max_new_tokens":
            self._record(self.last, fed=False)  # sampled but never fed: it joins the next prefill
        self.last = None
        events = []
        if self.text_stream is not None:
            tail = self.text_stream.flush()
            if tail:
                events.append(Event("text", token=None, text=tail))
        if self.conv.tokenizer is not None:
            try:
                self.conv.end_turn()
            except InputError:  # no room left for <|im_end|>: the conversation is full anyway
                pass
        events.append(Event("end", reason=reason))
        return events

    # ---- helpers ----------------------------------------------------------------------------

    def _begin_step(self) -> None:
        self.steps += 1
        self.left -= 1

    def _record(self, item, fed: bool) -> None:
        modality, value = item
        if modality == MODALITY_AUDIO_OUT:
            self.conv.add_audio_frames(value[None], fed=fed)
        else:
            self.conv.add_tokens([value], fed=fed)

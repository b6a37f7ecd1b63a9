"""The two generation modes, as streams of events.

Sequential: the model speaks text until it emits <|audio_start|>, then audio frames until a
frame whose first code is end-of-audio (ASR, TTS). Interleaved: chunks of n_text tokens and
n_audio frames alternate until the text ends with <|text_end|>; audio then runs on to
end-of-audio (live speech-to-speech). Both follow the reference's switching rules exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import END_OF_AUDIO, MODALITY_AUDIO_OUT
from ..errors import InputError
from .chat import Conversation
from .sampling import GREEDY, Sampling, sample

# Official ids; used only when a conversation has no tokenizer (bare token-id use).
OFFICIAL_IDS = {"im_end": 7, "audio_start": 128, "text_end": 130}


@dataclass
class Event:
    kind: str  # "text" | "audio" | "end"
    token: int | None = None  # text: the token id
    text: str = ""  # text: the decoded piece (may be "" while a character is incomplete)
    frame: torch.Tensor | None = None  # audio: [K] codes; all END_OF_AUDIO marks the end of speech
    reason: str | None = None  # end: "end_of_turn" | "max_new_tokens" | "context_limit"
    hidden: torch.Tensor | None = None  # with details=True: the backbone state the step used
    logits: torch.Tensor | None = None  # with details=True: text [V] or depth [K, 2049] logits
    audio: object = None  # audio: decoded samples of this frame, when a codec decodes the stream

    @property
    def is_end_of_audio(self) -> bool:
        return self.kind == "audio" and self.frame is not None and bool(self.frame[0] == END_OF_AUDIO)


def _special_ids(conv: Conversation) -> dict[str, int]:
    tok = conv.tokenizer
    if tok is None:
        return OFFICIAL_IDS
    return {"im_end": tok.im_end_id, "audio_start": tok.audio_start_id, "text_end": tok.text_end_id}


@torch.inference_mode()
def generate(
    conv: Conversation,
    mode: str = "interleaved",
    text_sampling: Sampling = GREEDY,
    audio_sampling: Sampling = GREEDY,
    max_new_tokens: int = 1024,
    seed: int | None = None,
    force_tokens: tuple[int, ...] = (),
    details: bool = False,
    force_frames: torch.Tensor | None = None,
) -> Iterator[Event]:
    """Generate the assistant's reply to what the conversation holds, one event per step.

    Each text token and each audio frame is one step of `max_new_tokens`. The reply (with its
    end-of-audio frame and <|text_end|>) is added to the conversation, and the turn is closed,
    so the next user turn can follow at once. `force_tokens` replaces the first text samples.
    `force_frames` [N, K] replaces the audio samples, in order, and ends the audio (end-of-audio)
    once spent: the reply's speech is given, its text still the model's (a diagnostic: how the
    text goes on after speech that is right).
    """
    if mode not in ("interleaved", "sequential"):
        raise InputError(f"mode must be 'interleaved' or 'sequential', got {mode!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    model, ids = conv.model, _special_ids(conv)
    n_text, n_audio = model.cfg.interleaved_n_text, model.cfg.interleaved_n_audio
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    text_stream = conv.tokenizer.stream(skip_special_tokens=True) if conv.tokenizer is not None else None
    forced = list(force_tokens)
    if force_frames is not None:
        force_frames = torch.as_tensor(force_frames, dtype=torch.long)
        K = model.cfg.codebooks
        if force_frames.dim() != 2 or force_frames.shape[1] != K:
            raise InputError(f"force_frames must be [frames, {K}] codes, got {tuple(force_frames.shape)}")
        if force_frames.numel() and not (0 <= int(force_frames.min()) and int(force_frames.max()) < END_OF_AUDIO):
            raise InputError(f"force_frames codes must lie in [0, {END_OF_AUDIO})")
        frames_left = list(force_frames.to(model.device))

    if conv.role != "assistant":
        conv.new_turn("assistant")
    h = conv.prefill()
    audio = False
    left, text_done = n_text, False
    last = None  # the item sampled last, not yet fed back
    reason = "max_new_tokens"
    for _ in range(max_new_tokens):
        left -= 1
        if not audio:
            logits = model.text_logits(h)
            tok = forced.pop(0) if forced else int(sample(logits, text_sampling, generator))
            last = (1, tok)
            if tok == ids["im_end"]:
                reason = "end_of_turn"
                if mode == "sequential":
                    yield Event("text", token=tok, text="", hidden=h if details else None,
                                logits=logits if details else None)
                break
            # Checkpoints pad their embedding past the tokenizer: such ids carry no text.
            known = text_stream is not None and tok < conv.tokenizer.vocab_size
            piece = text_stream.put(tok) if known else ""
            yield Event("text", token=tok, text=piece, hidden=h if details else None, logits=logits if details else None)
            if mode == "sequential":
                audio = tok == ids["audio_start"]
            else:
                text_done = text_done or tok == ids["text_end"]
                if left == 0 or text_done:
                    audio, left = True, n_audio
            embedding = model.lfm.embed_tokens(torch.tensor([tok], device=model.device))
        else:
            if details:
                frame, logits = model.sample_frame(h[None], audio_sampling, generator, return_logits=True)
                logits = logits[0]
            else:
                frame, logits = model.sample_frame(h[None], audio_sampling, generator), None
            frame = frame[0]
            if force_frames is not None:
                frame = frames_left.pop(0) if frames_left else torch.full_like(frame, END_OF_AUDIO)
            if frame[0] == END_OF_AUDIO:  # codebook 0 alone decides; the whole frame ends
                frame = torch.full_like(frame, END_OF_AUDIO)
            last = (MODALITY_AUDIO_OUT, frame)
            if mode == "interleaved" and left == 0 and not text_done:
                audio, left = False, n_text
            if frame[0] == END_OF_AUDIO:
                audio = False
            yield Event("audio", frame=frame, hidden=h if details else None, logits=logits)
            embedding = model.embed_audio_frames(frame[None])
        if conv.length + 1 > conv.max_context:
            reason = "context_limit"
            break
        _record(conv, last, fed=True)
        last = None
        h = conv.run(embedding)[-1]

    if last is not None and reason == "max_new_tokens":
        _record(conv, last, fed=False)  # sampled but never fed: it joins the next prefill
    if text_stream is not None:
        tail = text_stream.flush()
        if tail:
            yield Event("text", token=None, text=tail)
    if conv.tokenizer is not None:
        try:
            conv.end_turn()
        except InputError:  # no room left for <|im_end|>: the conversation is full anyway
            pass
    yield Event("end", reason=reason)


def _record(conv: Conversation, item, fed: bool) -> None:
    modality, value = item
    if modality == MODALITY_AUDIO_OUT:
        conv.add_audio_frames(value[None], fed=fed)
    else:
        conv.add_tokens([value], fed=fed)

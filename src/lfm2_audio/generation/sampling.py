"""Token sampling: greedy, temperature, top-k and top-p, all on the logits' device."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Sampling:
    """temperature <= 0 (or top_k == 1) means greedy, as in the reference."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            raise InputError(f"temperature must be a finite number, got {t!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InputError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < float(self.top_p) <= 1.0):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1

    def overridden(self, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None) -> "Sampling":
        """This sampling with the fields that are given (not None) replaced: a request's or a
        flag's settings over a model's defaults."""
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


GREEDY = Sampling()
# The reference README's audio settings for each task.
CHAT_AUDIO = Sampling(temperature=1.0, top_k=4)
TTS_AUDIO = Sampling(temperature=0.8, top_k=64)


def audio_sampling_defaults(config_extra: dict) -> dict[str, Sampling]:
    """A model's default audio sampling for "chat" and "tts": the reference's, unless its
    config.json says otherwise with a key of this project's own, e.g.
    `"audio_sampling": {"chat": {"temperature": 0}}` (fields missing there keep the reference's)."""
    defaults = {"chat": CHAT_AUDIO, "tts": TTS_AUDIO}
    given = config_extra.get("audio_sampling") or {}
    if not isinstance(given, dict) or set(given) - set(defaults):
        raise InputError(f'config.json audio_sampling must map "chat" and/or "tts" to settings, got {given!r}')
    for task, fields in given.items():
        if not isinstance(fields, dict) or set(fields) - {"temperature", "top_k", "top_p"}:
            raise InputError(f"config.json audio_sampling.{task} takes temperature, top_k and top_p, got {fields!r}")
        defaults[task] = dataclasses.replace(defaults[task], **fields)
    return defaults


def sample(logits: torch.Tensor, params: Sampling = GREEDY, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [..., V] -> token ids [...] (int64). Ties in greedy mode go to the lowest index."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    k = params.top_k
    if k is not None and k < logits.shape[-1] and params.top_p is None and logits.device.type == "cpu":
        # Draw among the k best only: the same distribution as the rule below, and a
        # multinomial over k columns instead of the vocabulary (2049 for audio codes) was most
        # of a sampled frame's cost. Entries tied with the k-th value all stay, as below (bf16
        # logits tie often); counting them is a host sync, free on CPU only.
        top, idx = logits.topk(k, dim=-1)
        kth = top[..., -1:]
        kept = int((logits >= kth).sum(-1).max())
        if kept > k:
            top, idx = logits.topk(kept, dim=-1)
            top = top.masked_fill(top < kth, float("-inf"))
        pick = torch.multinomial(top.softmax(-1).reshape(-1, kept), 1, generator=generator)
        return idx.reshape(-1, kept).gather(1, pick).reshape(logits.shape[:-1])
    if k is not None and k < logits.shape[-1]:
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the best token always stays.
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])

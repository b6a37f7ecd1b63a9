"""Voice activity detection for realtime sessions: when does the user start and stop talking.

Two scorers give a speech probability per 32 ms chunk (512 samples at 16 kHz):

* `SileroScorer`: the Silero VAD network shipped inside the `silero-vad` package (its
  TorchScript file; no torchaudio, no download). Its recurrent state is passed explicitly, so
  one model serves every session and the chunks of all sessions waiting at the same moment
  go through it as one batch: at 64 sessions one batched call costs about what 5 single ones
  do.
* `EnergyScorer`: a fallback without extra packages: loudness over an adaptive noise floor.
  Fine for a quiet room and for tests; it cannot tell speech from other loud sounds.

`VadWorker` is the thread that batches chunks across sessions. `TurnDetector` turns one
session's probabilities into speech-started / speech-stopped decisions (the server_vad
settings of OpenAI's Realtime API: threshold, prefix padding, silence duration).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("lfm2_audio.vad")

RATE = 16000
CHUNK = 512  # samples per decision (32 ms), what Silero expects at 16 kHz
SILENCE_RMS = 1e-3  # -60 dBFS: quieter chunks are silence without asking the model


class EnergyScorer:
    name = "energy"

    def new_state(self):
        return {"floor": -60.0}

    def score(self, chunks: np.ndarray, states: list) -> np.ndarray:
        """chunks [B, 512] -> pseudo-probabilities [B]: 0.5 at 12 dB over the noise floor."""
        rms = np.sqrt(np.mean(chunks.astype(np.float64) ** 2, axis=1) + 1e-12)
        db = 20 * np.log10(rms)
        out = np.empty(len(states), np.float32)
        for i, st in enumerate(states):
            # The floor follows quiet chunks fast and loud ones slowly (never above -30 dBFS),
            # so a steady hum becomes the floor but speech does not.
            rate = 0.3 if db[i] < st["floor"] else 0.002
            st["floor"] = min(-30.0, st["floor"] + rate * (db[i] - st["floor"]))
            out[i] = 1.0 / (1.0 + math.exp(-(db[i] - st["floor"] - 12.0) / 3.0))
        return out


class SileroScorer:
    name = "silero"

    def __init__(self):
        threads = torch.get_num_threads()
        try:
            from silero_vad import load_silero_vad

            wrapper = load_silero_vad(onnx=False)
        finally:
            torch.set_num_threads(threads)  # importing silero_vad sets torch to 1 thread
        self.model = wrapper._model  # the 16 kHz network: (x [B, 64 + 512], state) -> (p, state)
        self.context = int(self.model.context_size_samples)
        self.score(np.zeros((1, CHUNK), np.float32), [self.new_state()])  # load lazily-built parts now

    def new_state(self):
        return {"context": torch.zeros(self.context), "state": torch.zeros(2, 1, 128)}

    @torch.inference_mode()
    def score(self, chunks: np.ndarray, states: list) -> np.ndarray:
        # TorchScript's optimizing executor re-profiles the graph whenever the batch size
        # changes (ours changes all the time): 5-50 ms stalls that delay barge-in. Plain
        # execution costs about the same per call and never stalls.
        with torch.jit.optimized_execution(False):
            return self._score(chunks, states)

    def _score(self, chunks: np.ndarray, states: list) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(chunks, dtype=np.float32))
        ctx = torch.stack([s["context"] for s in states])
        state = torch.cat([s["state"] for s in states], dim=1)
        prob, state = self.model(torch.cat([ctx, x], dim=1), state)
        for i, s in enumerate(states):
            s["context"] = x[i, -self.context :].clone()
            s["state"] = state[:, i : i + 1].clone()
        return prob[:, 0].float().numpy()


def make_scorer(kind: str = "auto"):
    """"silero", "energy", or "auto" (Silero when its package is installed)."""
    if kind in ("auto", "silero"):
        try:
            return SileroScorer()
        except Exception as e:  # not installed, or a torch it cannot load with
            if kind == "silero":
                raise
            log.warning("silero-vad unavailable (%s); using the energy VAD", e)
    if kind not in ("auto", "energy", "silero"):
        raise ValueError(f"unknown VAD {kind!r}; use auto, silero or energy")
    return EnergyScorer()


class VadStream:
    """One session's link to the worker: 16 kHz samples in, one callback per 512-sample chunk."""

    def __init__(self, worker: "VadWorker", on_score: Callable[[float, int], None]):
        self.worker, self.on_score = worker, on_score
        self.state = worker.scorer.new_state()
        self.pending = np.zeros(0, np.float32)
        self.samples = 0  # samples handed over in whole chunks
        self.sent = 0  # chunks given to the worker (written by the feeding thread only)
        self.scored = 0  # ... and scored by it (written by the worker only)
        self.closed = False

    def feed(self, samples: np.ndarray) -> None:
        buf = np.concatenate([self.pending, samples]) if self.pending.size else samples
        n = buf.shape[0] // CHUNK
        for i in range(n):
            self.samples += CHUNK
            chunk = buf[i * CHUNK : (i + 1) * CHUNK]
            # Near-digital silence (what browsers' noise suppression sends between words, and
            # what a muted or idle microphone sends) is scored 0 without the network: most of a
            # voice session is the user listening. With nothing of this stream still in the
            # worker, it is scored here: no wake-up of the worker thread for a quiet microphone.
            silent = float(np.dot(chunk, chunk)) < SILENCE_RMS * SILENCE_RMS * CHUNK
            if silent and self.sent == self.scored:
                self.on_score(0.0, self.samples)
            else:
                self.sent += 1
                self.worker.put(self, None if silent else chunk, self.samples)
        self.pending = buf[n * CHUNK :].copy()

    def close(self) -> None:
        self.closed = True


class VadWorker:
    """Scores chunks from every session in batches on one thread. Each session's chunks are
    scored in order (its state carries from one to the next) and its callback gets the
    probability and the sample index where the chunk ends."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="lfm2-vad", daemon=True)
        self.thread.start()

    def stream(self, on_score: Callable[[float, int], None]) -> VadStream:
        return VadStream(self, on_score)

    def put(self, stream: VadStream, chunk: np.ndarray, end: int) -> None:
        self.queue.put((stream, chunk, end))

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            items = [item]
            while True:  # take everything that is waiting
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                items.append(nxt)
            # Round k scores the k-th waiting chunk of each session, all sessions in one batch.
            per_stream: dict[int, list] = {}
            for it in items:
                if not it[0].closed:
                    per_stream.setdefault(id(it[0]), []).append(it)
            rounds = max((len(v) for v in per_stream.values()), default=0)
            for k in range(rounds):
                batch = [v[k] for v in per_stream.values() if len(v) > k]
                scored = [b for b in batch if b[1] is not None]
                probs = {}
                if scored:
                    try:
                        out = self.scorer.score(np.stack([b[1] for b in scored]), [b[0].state for b in scored])
                    except Exception:
                        log.exception("VAD scoring failed")
                        for b in batch:
                            b[0].scored += 1
                        continue
                    probs = {id(b): p for b, p in zip(scored, out)}
                for b in batch:
                    stream, _, end = b
                    p = probs.get(id(b), 0.0)
                    try:
                        stream.on_score(float(p), end)
                    except Exception:
                        log.exception("VAD callback failed")
                    stream.scored += 1


@dataclass
class TurnSettings:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TurnSettings":
        from ..errors import InputError

        s = cls()
        for key, kind in (("threshold", float), ("prefix_padding_ms", int), ("silence_duration_ms", int),
                          ("create_response", bool), ("interrupt_response", bool)):
            if key in d and d[key] is not None:
                v = d[key]
                if kind is bool and not isinstance(v, bool) or kind is not bool and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise InputError(f"turn_detection.{key} must be a {kind.__name__}")
                setattr(s, key, kind(v))
        if not 0.0 < s.threshold < 1.0:
            raise InputError("turn_detection.threshold must be in (0, 1)")
        if not 0 <= s.prefix_padding_ms <= 5000 or not 0 < s.silence_duration_ms <= 10000:
            raise InputError("turn_detection: prefix_padding_ms in [0, 5000], silence_duration_ms in (0, 10000]")
        return s

    def to_dict(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response}


@dataclass
class TurnDetector:
    """Speech starts at the first chunk at or over the threshold (so barge-in is immediate)
    and stops after `silence_duration_ms` of chunks under it."""

    settings: TurnSettings = field(default_factory=TurnSettings)
    speaking: bool = False
    start: int = 0  # sample index where the current speech began
    last_speech: int = 0  # end of the last chunk over the threshold

    def update(self, prob: float, end: int) -> str | None:
        """-> "started", "stopped" or None, for the chunk ending at sample `end`."""
        s = self.settings
        if prob >= s.threshold:
            self.last_speech = end
            if not self.speaking:
                self.speaking, self.start = True, end - CHUNK
                return "started"
        elif self.speaking and end - self.last_speech >= s.silence_duration_ms * RATE // 1000:
            self.speaking = False
            return "stopped"
        return None

    def reset(self) -> None:
        self.speaking = False

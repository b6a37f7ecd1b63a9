"""Audio on the wire: PCM16 and streamed WAV out, PCM16 (base64) in, and the codec worker.

The engine produces code frames; turning them into samples is the codec's job and runs on
one worker thread shared by every reply (`CodecWorker`), off the engine's thread and off the
event loop. Each reply has its own streaming decoder (`codec.stream(1)`), fed all the frames
that are waiting at once: under load a call decodes several frames, which costs little more
than one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soxr
import torch

from ..errors import InputError


def to_pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> little-endian 16-bit PCM (clipped: random codecs can overshoot)."""
    a = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (a * 32767.0).round().astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise InputError("PCM16 audio must have an even number of bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def decode_base64_pcm16(text) -> np.ndarray:
    if not isinstance(text, str):
        raise InputError("audio must be a base64 string of 16-bit little-endian PCM")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("audio is not valid base64") from None
    return from_pcm16(raw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def wav_header(sample_rate: int, num_samples: int | None = None) -> bytes:
    """A 16-bit mono WAV header. With num_samples=None (a stream of unknown length) the size
    fields hold the largest value, which players read as 'until the end of the data'."""
    data_bytes = 0xFFFFFFFF - 36 if num_samples is None else 2 * num_samples
    riff = min(36 + data_bytes, 0xFFFFFFFF)
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


class InputResampler:
    """Streaming resampler for microphone audio arriving in small pieces."""

    def __init__(self, from_rate: int, to_rate: int):
        self.from_rate, self.to_rate = from_rate, to_rate
        self.stream = None if from_rate == to_rate else soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32")

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.stream is None:
            return samples.astype(np.float32, copy=False)
        return self.stream.resample_chunk(samples.astype(np.float32, copy=False))


class CodecWorker:
    """One thread that runs every codec call, so decoding never blocks the event loop nor
    fights the engine thread for more than one core."""

    def __init__(self, codec):
        self.codec = codec
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfm2-codec")

    @property
    def sample_rate(self) -> int | None:
        return self.codec.sample_rate if self.codec is not None else None

    def decoder(self) -> "StreamDecoder":
        if self.codec is None:
            raise InputError("this checkpoint has no audio codec: audio output is not available")
        return StreamDecoder(self)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class StreamDecoder:
    """Streaming decode of one reply's frames: each call returns the samples now final."""

    def __init__(self, worker: CodecWorker):
        self.worker = worker
        self.stream = None  # created on the worker thread with the first frames

    def _decode(self, frames: list[torch.Tensor]) -> np.ndarray:
        if self.stream is None:
            self.stream = self.worker.codec.stream(1)
        codes = torch.stack(frames).T[None].to(torch.long)  # [1, K, t]
        with torch.inference_mode():
            out = self.stream.decode(codes)
        return out[0].float().cpu().numpy()

    def _flush(self) -> np.ndarray:
        if self.stream is None or not hasattr(self.stream, "flush"):
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            out = self.stream.flush()
        return out[0].float().cpu().numpy() if out is not None else np.zeros(0, np.float32)

    async def decode(self, frames: list[torch.Tensor]) -> np.ndarray:
        return await self.worker.run(self._decode, frames)

    async def flush(self) -> np.ndarray:
        return await self.worker.run(self._flush)

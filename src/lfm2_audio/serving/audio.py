"""Audio on the wire: PCM16 and streamed WAV out, PCM16 (base64) in, and the codec worker.

The engine produces code frames; turning them into samples is the codec's job and runs in
one worker shared by every reply (`CodecWorker`), off the engine's thread and off the event
loop. Each reply has its own streaming decoder (`codec.stream(1)`), fed all the frames that
are waiting at once: under load a call decodes several frames, which costs little more than
one.

A codec on the CPU runs in a child process. On one thread it would share the interpreter lock
with the engine: every torch op releases and retakes the lock, so the engine's hundreds of
small ops per step each waited for the codec's Python, and both threads' CPU per frame grew by
half again. (Measured on 2 cores, demo model, Griffin-Lim vocoder, 16 sessions: engine 6.4 ms
of CPU per frame and 33 lock waits with the codec on a thread, 5.0 ms and 14 with no codec
work in the process.) A codec on a GPU stays on a thread: a child would need a CUDA context of
its own, and GPU decoding holds the lock little.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import logging
import multiprocessing
import struct
import sys
import types
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import soxr
import torch

from ..errors import InputError

log = logging.getLogger("lfm2_audio.serving")


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


@contextlib.contextmanager
def _main_hidden():
    """A spawned child imports the parent's __main__ again: a script without an
    `if __name__ == "__main__":` guard would run once more there (load a model, start a server).
    The child needs nothing from it, so it is hidden while the child starts."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def codec_on_cpu(codec) -> bool:
    device = getattr(codec, "device", None)
    if device is None:
        device = next(iter(codec.state_dict().values()), torch.zeros(0)).device
    return torch.device(device).type == "cpu"


class CodecWorker:
    """Runs every codec call, in order: in a child process (`process=True`; None = when the
    codec is on the CPU) or on one thread. Either way decoding never blocks the event loop nor
    fights the engine thread for more than one core."""

    def __init__(self, codec, process: bool | None = None, threads: int | None = None):
        self.codec = codec
        self.process = codec is not None and (codec_on_cpu(codec) if process is None else bool(process))
        self.threads = threads or torch.get_num_threads()
        self._restart = None  # the replacement child starting
        self.pool = self._start()

    def _start(self):
        if self.process:
            # spawn, not fork: this process already runs torch's thread pools.
            pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_child_init, initargs=(self.codec, self.threads))
            try:
                with _main_hidden():
                    pool.submit(_child_ping).result()  # start it now, not on a reply's time to audio
                return pool
            except Exception:
                log.warning("cannot start the codec process; decoding on a thread", exc_info=True)
                pool.shutdown(wait=True, cancel_futures=True)
                self.process = False
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfm2-codec")

    @property
    def sample_rate(self) -> int | None:
        return self.codec.sample_rate if self.codec is not None else None

    def decoder(self) -> "StreamDecoder":
        if self.codec is None:
            raise InputError("this checkpoint has no audio codec: audio output is not available")
        return StreamDecoder(self)

    async def run(self, fn, *args):
        pool = self.pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            # The child died (killed, out of memory): the replies it was decoding fail, later
            # ones get a fresh child.
            if self.pool is pool and self._restart is None:  # once, however many calls failed
                log.error("codec process died; starting a new one")
                self._restart = asyncio.get_running_loop().run_in_executor(None, self._start)
                try:
                    self.pool = await self._restart
                finally:
                    self._restart = None
            raise

    def post(self, fn, *args) -> None:
        """Fire and forget (the child drops a stream's state)."""
        try:
            self.pool.submit(fn, *args)
        except RuntimeError:  # shut down, or broken: nothing is left to drop
            pass

    def close(self) -> None:
        # A process pool left without waiting writes to its closed wake-up pipe at exit
        # (an ignored OSError); waiting costs at most the call in progress.
        self.pool.shutdown(wait=self.process, cancel_futures=True)


class StreamDecoder:
    """Streaming decode of one reply's frames: each call returns the samples now final."""

    _ids = itertools.count()

    def __init__(self, worker: CodecWorker):
        self.worker = worker
        self.id = next(self._ids)
        self.stream = None  # thread worker: created on the worker thread with the first frames
        self.started = False  # the worker holds this stream's state

    async def decode(self, frames: list[torch.Tensor]) -> np.ndarray:
        codes = torch.stack(frames).T[None].to(torch.long).cpu()  # [1, K, t]
        self.started = True
        if self.worker.process:
            return await self.worker.run(_child_decode, self.id, codes.numpy())
        return await self.worker.run(self._decode, codes)

    async def flush(self) -> np.ndarray:
        if not self.started:
            return np.zeros(0, np.float32)
        self.started = False
        if self.worker.process:
            return await self.worker.run(_child_flush, self.id)
        return await self.worker.run(self._flush)

    def close(self) -> None:
        """Forget the stream without its tail (a reply that ended early)."""
        if self.started and self.worker.process:
            self.worker.post(_child_drop, self.id)
        self.started = False

    def _decode(self, codes: torch.Tensor) -> np.ndarray:
        if self.stream is None:
            self.stream = self.worker.codec.stream(1)
        return decode_frames(self.stream, codes)

    def _flush(self) -> np.ndarray:
        return flush_stream(self.stream)


def decode_frames(stream, codes: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        out = stream.decode(codes)
    return out[0].float().cpu().numpy()


def flush_stream(stream) -> np.ndarray:
    if stream is None or not hasattr(stream, "flush"):
        return np.zeros(0, np.float32)
    with torch.inference_mode():
        out = stream.flush()
    return out[0].float().cpu().numpy() if out is not None else np.zeros(0, np.float32)


# ---- the codec process ---------------------------------------------------------------------
# Module-level functions, so the pool can send them by name; the child keeps each reply's
# stream under the id its StreamDecoder has in the parent.

_child = types.SimpleNamespace(codec=None, streams={})


def _child_init(codec, threads: int) -> None:
    torch.set_num_threads(threads)
    _child.codec = codec


def _child_ping() -> bool:
    return True


def _child_decode(stream_id: int, codes: np.ndarray) -> np.ndarray:
    stream = _child.streams.get(stream_id)
    if stream is None:
        stream = _child.streams[stream_id] = _child.codec.stream(1)
    return decode_frames(stream, torch.from_numpy(codes))


def _child_flush(stream_id: int) -> np.ndarray:
    return flush_stream(_child.streams.pop(stream_id, None))


def _child_drop(stream_id: int) -> None:
    _child.streams.pop(stream_id, None)

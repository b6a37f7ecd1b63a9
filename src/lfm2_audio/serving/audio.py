"""Audio on the wire: PCM16 and streamed WAV out, PCM16 (base64) in, and the codec worker.

The engine produces code frames; turning them into samples is the codec's job and runs in
one worker shared by every reply (`CodecWorker`), off the engine's thread and off the event
loop. Each reply has its own streaming decoder (`codec.stream(1)`), fed all its frames that
are waiting at once, and the pushes of all replies waiting while a call runs go in the next call
together.

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

from ..codec import decode_streams
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
def main_hidden():
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
    fights the engine thread for more than one core.

    Decodes are batched across replies: the frames every reply has waiting while a call runs
    go to the codec together in the next call (`codec.decode_streams`), one call and one round
    trip to the child instead of one per reply. (16 replies of the demo model with Griffin-Lim:
    ~1 ms of the codec's CPU per frame against ~2 ms one reply at a time.)"""

    def __init__(self, codec, process: bool | None = None, threads: int | None = None,
                 stream_options: dict | None = None):
        """stream_options: what each reply's `codec.stream(1, **options)` gets."""
        self.codec = codec
        self.stream_options = stream_options or {}
        self.process = codec is not None and (codec_on_cpu(codec) if process is None else bool(process))
        self.threads = threads or torch.get_num_threads()
        self.host = CodecHost(codec, self.stream_options)  # the streams, when decoding on a thread
        self._restart = None  # the replacement child starting
        self._waiting: list = []  # (stream id, codes, future) for the next call
        self._draining = False
        self.calls = 0  # decode calls made, and the pushes they carried
        self.pushes = 0
        self.pool = self._start()

    def _start(self):
        if self.process:
            # spawn, not fork: this process already runs torch's thread pools.
            pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_child_init, initargs=(self.codec, self.threads, self.stream_options))
            try:
                with main_hidden():
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

    def _call(self, method: str, *args):
        """What the pool runs for CodecHost.method(*args): the child's host or this process's."""
        if self.process:
            return (_child_call, method) + args
        return (getattr(self.host, method),) + args

    async def run(self, method: str, *args):
        pool = self.pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, *self._call(method, *args))
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

    async def decode(self, stream_id: int, codes: np.ndarray) -> np.ndarray:
        """One push of a reply's stream, sent with the pushes of other replies waiting with it."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((stream_id, codes, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = [w for w in self._waiting if not w[2].done()]  # (a cancelled reply's)
                self._waiting = []
                if not batch:
                    continue
                self.calls += 1
                self.pushes += len(batch)
                try:
                    results = await self.run("decode", [(i, c) for i, c, _ in batch])
                except asyncio.CancelledError:  # the loop is closing
                    for _, _, future in batch:
                        future.cancel()
                    raise
                except Exception as e:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, _, future), audio in zip(batch, results):
                    if not future.done():
                        future.set_result(audio)
        finally:
            self._draining = False

    def forget(self, stream_id: int) -> None:
        """Drop a stream without its tail (its reply ended early), pushes not yet sent included."""
        self._waiting = [w for w in self._waiting if w[0] != stream_id]
        try:
            self.pool.submit(*self._call("drop", stream_id))
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
        self.started = False  # the worker holds this stream's state

    async def decode(self, frames: list[torch.Tensor]) -> np.ndarray:
        codes = torch.stack(frames).T[None].to(torch.long).cpu().numpy()  # [1, K, t]
        self.started = True
        return await self.worker.decode(self.id, codes)

    async def flush(self) -> np.ndarray:
        if not self.started:
            return np.zeros(0, np.float32)
        self.started = False
        return await self.worker.run("flush", self.id)

    def close(self) -> None:
        """Forget the stream without its tail (a reply that ended early)."""
        if self.started:
            self.worker.forget(self.id)
        self.started = False


class CodecHost:
    """The codec's side of the worker (in the child, or on the worker's thread): each reply's
    stream under the id its StreamDecoder has."""

    def __init__(self, codec, stream_options: dict | None = None):
        self.codec, self.streams, self.stream_options = codec, {}, stream_options or {}

    def decode(self, pushes: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        streams = []
        for stream_id, _ in pushes:
            if stream_id not in self.streams:
                self.streams[stream_id] = self.codec.stream(1, **self.stream_options)
            streams.append(self.streams[stream_id])
        with torch.inference_mode():
            out = decode_streams(streams, [torch.from_numpy(c) for _, c in pushes])
        return [o[0].float().cpu().numpy() for o in out]

    def flush(self, stream_id: int) -> np.ndarray:
        stream = self.streams.pop(stream_id, None)
        if stream is None or not hasattr(stream, "flush"):
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            out = stream.flush()
        return out[0].float().cpu().numpy() if out is not None else np.zeros(0, np.float32)

    def drop(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)


# ---- the codec process ---------------------------------------------------------------------
# Module-level functions, so the pool can send them by name; the child's CodecHost keeps each
# reply's stream under the id its StreamDecoder has in the parent.

_host: CodecHost | None = None


def _child_init(codec, threads: int, stream_options: dict) -> None:
    global _host
    torch.set_num_threads(threads)
    _host = CodecHost(codec, stream_options)


def _child_ping() -> bool:
    return True


def _child_call(method: str, *args):
    return getattr(_host, method)(*args)

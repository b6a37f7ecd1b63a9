"""What every front end shares: the engine, the codec and VAD workers, metrics, admission.

HTTP endpoints, the realtime WebSocket and the Gradio demo all go through `Runtime`:
`open_session` (waits a bounded time for a free row), `reply` (an async stream of text pieces
and decoded audio for one engine request) and `drain` for a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..generation.chat import SYSTEM_PROMPTS, VOICES, transcript_token_cap
from ..codec.griffinlim import GriffinLim
from .audio import CodecWorker, StreamDecoder
from .engine import Engine, EngineClosed, EngineFull, Session
from .engine_process import EngineProcess
from .metrics import Metrics
from .reply import ReplyParams
from .vad import VadWorker, make_scorer

log = logging.getLogger("lfm2_audio.serving")

VOICE_NAMES = {"us-male": "US male", "us-female": "US female", "uk-male": "UK male", "uk-female": "UK female"}


@dataclass
class ServeConfig:
    model_name: str = "lfm2-audio"
    max_sessions: int = 16
    max_context: int = 4096
    prefill_chunk: int = 2048  # positions per backbone call in a prefill, at most
    # Seconds of prefill between two decode steps while others decode. Turns that end together
    # (16 sessions, demo model, 2 cores) join the batch sooner with 0.1 than 0.05, which stays
    # ahead of real time far more often (5 runs each: all 16 streams faster than real time in 4
    # against 0); at 0.2 the replies already playing stall.
    prefill_budget: float = 0.1
    queue_timeout: float = 10.0  # how long a request may wait for a free session
    max_queue: int = 64  # requests waiting for a session beyond this are refused at once
    max_upload_bytes: int = 25 * 1024 * 1024
    max_message_bytes: int = 8 * 1024 * 1024  # one WebSocket message
    max_new_tokens: int = 1024  # default reply length (text tokens + audio frames)
    max_new_tokens_limit: int = 4096
    max_transcript_tokens: int = 512
    max_input_seconds: float = 120.0  # one user turn of streamed audio
    send_timeout: float = 15.0  # a client that accepts nothing for this long is dropped
    max_backlog_events: int = 4096  # undelivered events of one reply before it is stopped
    max_backlog_bytes: int = 32 * 1024 * 1024  # unsent realtime messages before the client is dropped
    shutdown_timeout: float = 10.0
    vad: str = "auto"  # auto | silero | energy
    threads: int | None = None
    switch_interval: float | None = 0.0002  # seconds (sys.setswitchinterval); None leaves it
    codec_process: bool | None = None  # decode in a child process; None: when the codec is on the CPU
    engine_process: bool | None = None  # run the engine in a child process; None: when the model is on the CPU


class Busy(Exception):
    """No session could be had in time (HTTP 503, realtime error "server_busy")."""


class ShuttingDown(Busy):
    pass


@dataclass
class Chunk:
    """One piece of a reply as the front ends see it."""

    kind: str  # "text" | "audio" | "error" | "end"
    text: str = ""
    audio: np.ndarray | None = None  # float32 at the codec's rate
    frames: int = 0
    reason: str | None = None  # end: end_of_turn | max_new_tokens | context_limit | cancelled | error | shutdown | slow_client
    code: str | None = None  # error: a short code


def chat_system_prompt(instructions: str | None = None, voice: str | None = None) -> str:
    """The system turn of a conversation. The model was trained on SYSTEM_PROMPTS; a voice is
    asked for the way its TTS prompts do ("Use the UK female voice.")."""
    text = instructions if instructions else SYSTEM_PROMPTS["chat"]
    if voice:
        check_voice(voice)
        text = f"{text} Use the {VOICE_NAMES[voice]} voice."
    return text


def check_voice(voice) -> str:
    if voice not in VOICES:
        raise InputError(f"voice must be one of {', '.join(VOICES)}; got {voice!r}")
    return voice


class LoopInbox:
    """Calls from worker threads onto one event loop, many per wake-up.

    `call_soon_threadsafe` wakes the loop through its self-pipe on every call. The engine
    emits an event per session per step and the VAD a score per session per chunk: at 16
    sessions, thousands of wake-ups a second, each a system call and a trip through the loop.
    Here calls queue up and one wake-up runs every call that arrived meanwhile, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.calls: deque = deque()
        self.scheduled = False

    def post(self, fn, *args) -> None:
        """Any thread. Raises RuntimeError once the loop is closed."""
        self.calls.append((fn, args))
        if not self.scheduled:
            # A post racing with _run may schedule one run too many, never one too few: _run
            # clears the flag before it empties the queue.
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        self.scheduled = False
        calls = self.calls
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("callback from a worker thread failed")


class ReplyStream:
    """The events of one engine request as Chunks, audio decoded on the codec worker.

    The engine never waits for a consumer: events queue here. A consumer that falls more
    than `max_backlog` events behind (a client that stopped reading) gets its reply stopped,
    with end reason "slow_client"."""

    def __init__(self, runtime: "Runtime", session: Session, turns, params: ReplyParams, audio: bool,
                 t0: float | None = None):
        self.runtime = runtime
        self.inbox = runtime.inbox(asyncio.get_running_loop())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pushed = self.popped = 0
        self.overflow = False
        self.decoder: StreamDecoder | None = runtime.codec.decoder() if audio else None
        self.t0 = t0 if t0 is not None else time.perf_counter()
        self.t_first_audio: float | None = None
        self.t_first_text: float | None = None
        self.frames = 0
        self.samples_sent = 0
        self.pending_since: float | None = None
        self.max_backlog = runtime.config.max_backlog_events
        self.request = session.submit(turns, params, self._sink)

    def _sink(self, event) -> None:  # engine thread
        self.pushed += 1
        if self.pushed - self.popped > self.max_backlog and not self.overflow:
            self.overflow = True
            self.request.cancel()
        try:
            self.inbox.post(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass

    def cancel(self) -> None:
        self.request.cancel()

    async def _next(self):
        event = await self.queue.get()
        self.popped += 1
        return event

    def _next_nowait(self):
        event = self.queue.get_nowait()
        self.popped += 1
        return event

    async def __aiter__(self):
        """Chunks in order. Audio frames are decoded in batches: the first at once (time to
        first audio), later ones when `runtime.max_batch` are waiting or when the audio already
        sent would run out within LOW_WATER seconds of playback. A HiFi-GAN call costs nearly the
        same for one frame as for eight, so when generation runs ahead of real time this saves
        most of the codec's work without ever letting a listener's buffer run dry. (Griffin-Lim
        costs the same per frame in any batch of whole windows: it batches 2 frames, and
        vocodes a longer backlog the cheap way.)"""
        held, pending = None, []
        self.runtime.replies += 1
        try:
            while True:
                if held is not None:
                    e, held = held, None
                else:
                    wait = self._decode_wait(pending)
                    e = None
                    if wait is None:
                        e = await self._next()
                    elif wait > 0:
                        try:
                            async with asyncio.timeout(wait):
                                e = await self._next()
                        except TimeoutError:
                            pass
                if e is None:  # the listener needs audio now
                    async for c in self._decode(pending):
                        yield c
                    continue
                if e.kind == "audio" and self.decoder is not None and not e.is_end_of_audio:
                    pending.append(e.frame)
                    while not self.queue.empty():  # take every frame already waiting
                        nxt = self._next_nowait()
                        if nxt.kind == "audio" and not nxt.is_end_of_audio:
                            pending.append(nxt.frame)
                        else:
                            held = nxt
                            break
                    if self._decode_wait(pending) == 0:
                        async for c in self._decode(pending):
                            yield c
                elif e.kind == "audio":
                    if self.decoder is None:
                        continue
                    # End of audio: the codec stream ends with the segment; later audio (if
                    # any) starts a new one.
                    async for c in self._decode(pending):
                        yield c
                    tail = await self.decoder.flush()
                    self.decoder = self.runtime.codec.decoder()
                    if tail.size:
                        yield self._audio_chunk(tail, 0)
                elif e.kind == "text":
                    if e.text:
                        if self.t_first_text is None:
                            self.t_first_text = time.perf_counter()
                            self.runtime.metrics.ttft.observe(self.t_first_text - self.t0)
                        yield Chunk("text", text=e.text)
                elif e.kind == "error":
                    self.runtime.metrics.errors.inc(code=e.text or "error")
                    yield Chunk("error", text=e.reason, code=e.text)
                elif e.kind == "end":
                    if self.decoder is not None:
                        async for c in self._decode(pending):
                            yield c
                        tail = await self.decoder.flush()
                        if tail.size:
                            yield self._audio_chunk(tail, 0)
                    reason = "slow_client" if self.overflow else e.reason
                    yield Chunk("end", reason=reason)
                    return
        finally:
            if not self.request.done:
                self.request.cancel()  # the consumer left early (client gone): stop the work
            if self.decoder is not None:
                self.decoder.close()
            self.runtime.replies -= 1

    LOW_WATER = 0.3  # seconds of sent audio left to play below which frames are decoded at once
    MAX_BATCH = 8  # frames per codec call (Runtime.max_batch: 2 for Griffin-Lim)
    REBUFFER = 4  # frames gathered before the next chunk once the listener has run dry
    REBUFFER_WAIT = 0.3  # ... or this long, whichever comes first

    def _decode_wait(self, pending) -> float | None:
        """How long pending frames may wait for company: None (nothing pending), 0 (now), or
        seconds. Like a video player: ahead of playback, decode just in time and in big
        batches; once playback has run dry (generation slower than real time, e.g. under
        overload), rebuffer a few frames per call rather than spend the CPU the generator
        needs on one codec call per frame."""
        now = time.perf_counter()
        if not pending:
            self.pending_since = None
            return None
        if self.pending_since is None:
            self.pending_since = now
        if self.t_first_audio is None or len(pending) >= self.runtime.max_batch:
            return 0.0
        ahead = self.samples_sent / self.runtime.codec.sample_rate - (now - self.t_first_audio)
        if ahead > self.LOW_WATER:
            return ahead - self.LOW_WATER
        if ahead > 0 or len(pending) >= self.REBUFFER:
            return 0.0
        return max(0.0, self.pending_since + self.REBUFFER_WAIT - now)

    async def _decode(self, pending):
        if not pending:
            return
        frames = list(pending)
        pending.clear()
        self.pending_since = None
        audio = await self.decoder.decode(frames)
        if audio.size:
            yield self._audio_chunk(audio, len(frames))

    def _audio_chunk(self, audio, frames: int) -> Chunk:
        self.frames += frames
        if self.t_first_audio is None:
            self.t_first_audio = time.perf_counter()
            self.runtime.metrics.ttfa.observe(self.t_first_audio - self.t0)
        self.samples_sent += audio.size
        return Chunk("audio", audio=audio, frames=frames)


class Runtime:
    def __init__(self, lfm, config: ServeConfig | None = None, fast: bool = False):
        """fast: decode with generation/fast.py (lfm.model may be a FastLFM2Audio already), built
        where the engine runs: in its child process, or here, replacing lfm.model."""
        self.lfm = lfm
        self.config = config or ServeConfig()
        c = self.config
        on_cpu = lfm.model.device.type == "cpu"
        in_child = c.engine_process if c.engine_process is not None else on_cpu
        if fast and not in_child:
            from ..generation.fast import FastLFM2Audio

            if not isinstance(lfm.model, FastLFM2Audio):
                lfm.model = FastLFM2Audio(lfm.model, threads=c.threads)
        if c.threads:
            torch.set_num_threads(c.threads)
        self.metrics = Metrics()
        self.max_batch, stream_options = ReplyStream.MAX_BATCH, {}
        if isinstance(getattr(lfm.codec, "vocoder", None), GriffinLim):
            # Its runs cost the same per frame in any batch: decode 2 frames a call at most, and
            # let a backlog (a codec falling behind under load) be vocoded the cheap way.
            self.max_batch, stream_options = 2, {"backlog": 2}
        self.codec = CodecWorker(lfm.codec, process=c.codec_process, threads=c.threads or 1,
                                 stream_options=stream_options)
        if not c.threads and self.codec.process:
            from ..generation.fast import usable_cores

            # The codec's child has a core to itself: the engine leaves it that core rather than
            # have two thread pools fight over it (on 2 cores: 244 against 138 frames/s at 16
            # sessions, demo model). From the core count, not the pool's current size, which a
            # second Runtime in the same process would shrink again.
            torch.set_num_threads(max(1, usable_cores() - 1))
        engine_args = dict(max_sessions=c.max_sessions, max_context=c.max_context, prefill_chunk=c.prefill_chunk,
                           prefill_budget=c.prefill_budget, on_slot_freed=self._slot_freed)
        if in_child:
            self.engine = EngineProcess(lfm.model, lfm.tokenizer, threads=torch.get_num_threads(), fast=fast,
                                        **engine_args)
        else:
            self.engine = Engine(lfm.model, lfm.tokenizer, **engine_args)
        self.engine.step_observers.append(lambda dt, n: self.metrics.step.observe(dt))
        self.vad: VadWorker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._freed: asyncio.Event | None = None
        self.waiting = 0
        self.replies = 0
        self.draining = False
        self.connections: set = set()  # realtime connections, told when the server stops
        self._inboxes: dict = {}  # event loop -> LoopInbox
        self.started_at = time.time()
        self._register_gauges()

    def inbox(self, loop: asyncio.AbstractEventLoop) -> LoopInbox:
        """The inbox of `loop` (the server's, or another front end's such as Gradio's)."""
        box = self._inboxes.get(loop)
        if box is None:
            box = self._inboxes[loop] = LoopInbox(loop)
        return box

    @property
    def has_audio_output(self) -> bool:
        return self.lfm.codec is not None

    def _register_gauges(self) -> None:
        m, e, s = self.metrics, self.engine, self.engine.stats
        m.gauge("lfm2_sessions_open", "Engine sessions open (each holds a cache row)", lambda: e.open_sessions)
        m.gauge("lfm2_sessions_max", "Engine session limit", lambda: e.max_sessions)
        m.gauge("lfm2_sessions_waiting", "Requests queued for a free session", lambda: self.waiting)
        m.gauge("lfm2_requests_in_flight", "Replies being generated or queued in the engine", lambda: e.active_requests)
        m.gauge("lfm2_engine_decoding", "Sessions in the current decode batch", lambda: s.decoding)
        m.gauge("lfm2_engine_prefill_queue", "Sessions waiting for or in prefill", lambda: s.prefilling)
        m.gauge("lfm2_realtime_connections", "Open realtime WebSocket connections", lambda: len(self.connections))
        m.gauge("lfm2_reply_streams", "Replies being streamed to clients", lambda: self.replies)
        m.counter_fn("lfm2_engine_steps_total", "Batched decode steps", lambda: s.steps)
        m.counter_fn("lfm2_engine_step_rows_total", "Rows over all decode steps (mean batch = rows / steps)", lambda: s.step_rows)
        m.counter_fn("lfm2_generated_tokens_total", "Text tokens generated", lambda: s.tokens)
        m.counter_fn("lfm2_generated_frames_total", "Audio frames generated (80 ms each)", lambda: s.frames)
        m.counter_fn("lfm2_prefill_positions_total", "Prompt positions prefilled", lambda: s.prefill_positions)
        m.counter_fn("lfm2_prefill_calls_total", "Batched prefill calls (rows over calls: prompts prefilled together)", lambda: s.prefill_calls)
        m.counter_fn("lfm2_prefill_rows_total", "Prompt rows over the batched prefill calls", lambda: s.prefill_rows)
        m.counter_fn("lfm2_codec_calls_total", "Codec decode calls", lambda: self.codec.calls)
        m.counter_fn("lfm2_codec_pushes_total", "Replies' pushes over the codec calls (decoded together)",
                     lambda: self.codec.pushes)
        m.counter_fn("lfm2_cancelled_total", "Replies cancelled", lambda: s.cancelled)

    # ---- lifecycle --------------------------------------------------------------------------

    async def startup(self) -> None:
        if self.config.switch_interval:
            # Torch ops release the GIL, and taking it back waits for whichever Python thread
            # holds it (event loop, VAD, codec) for up to the switch interval. At Python's 5 ms
            # default a decode step, hundreds of small ops, spends most of its time waiting.
            sys.setswitchinterval(self.config.switch_interval)
        self.loop = asyncio.get_running_loop()
        self._freed = asyncio.Event()
        self.engine.start()
        if self.vad is None:
            self.vad = VadWorker(make_scorer(self.config.vad))

    async def drain(self, timeout: float | None = None) -> None:
        """Graceful stop: refuse new work, let replies in flight finish (up to `timeout`),
        then close realtime connections and stop the engine."""
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        self.draining = True
        for conn in list(self.connections):
            conn.server_closing()
        deadline = time.monotonic() + timeout
        while self.engine.active_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            await conn.close(1001, "server shutting down")

    def shutdown(self) -> None:
        self.engine.stop()
        self.codec.close()
        if self.vad is not None:
            self.vad.close()

    # ---- admission --------------------------------------------------------------------------

    def _slot_freed(self) -> None:  # engine thread
        if self.loop is not None and self._freed is not None:
            try:
                self.loop.call_soon_threadsafe(self._wake_waiters)
            except RuntimeError:
                pass

    def _wake_waiters(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    async def open_session(self, system: str | None, max_context: int | None = None,
                           wait: float | None = None) -> Session:
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        try:
            return self.engine.open_session(system=system, max_context=max_context)
        except EngineFull:
            pass
        except EngineClosed:
            raise ShuttingDown("the server is shutting down") from None
        wait = self.config.queue_timeout if wait is None else wait
        if self.waiting >= self.config.max_queue or wait <= 0:
            raise Busy(f"all {self.engine.max_sessions} sessions are busy; try again later")
        self.waiting += 1
        deadline = time.monotonic() + wait
        try:
            while True:
                freed = self._freed
                try:
                    return self.engine.open_session(system=system, max_context=max_context)
                except EngineFull:
                    pass
                except EngineClosed:
                    raise ShuttingDown("the server is shutting down") from None
                left = deadline - time.monotonic()
                if left <= 0 or self.draining:
                    raise Busy(f"all {self.engine.max_sessions} sessions stayed busy for {wait:g} s; try again later")
                try:
                    async with asyncio.timeout(min(left, 0.5)):
                        await freed.wait()
                except TimeoutError:
                    pass
        finally:
            self.waiting -= 1

    # ---- replies ----------------------------------------------------------------------------

    def reply(self, session: Session, turns, params: ReplyParams, audio: bool, t0: float | None = None) -> ReplyStream:
        if audio and not self.has_audio_output:
            raise InputError("this checkpoint has no audio codec: only text output is available")
        return ReplyStream(self, session, turns, params, audio, t0)

    def clamp_tokens(self, n) -> int:
        if n is None:
            return self.config.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"max tokens must be a positive integer, got {n!r}")
        return min(n, self.config.max_new_tokens_limit)

    async def transcribe(self, features, max_new_tokens: int | None = None, t0: float | None = None):
        """Speech -> text on a session of its own. Yields text pieces, then the end Chunk."""
        from ..generation.sampling import GREEDY

        seconds = features.value.shape[-1] * self.lfm.model.cfg.preprocessor.window_stride
        max_new_tokens = min(max_new_tokens or self.config.max_transcript_tokens, transcript_token_cap(seconds))
        session = await self.open_session(SYSTEM_PROMPTS["asr"])
        try:
            # the model's own decoding (config.json asr_decoding): a beam search comes whole at its end
            params = ReplyParams(mode="sequential", text_sampling=GREEDY, audio_sampling=GREEDY,
                                 max_new_tokens=max_new_tokens, stop_at_audio=True,
                                 asr_decoding=getattr(self.lfm, "asr_decoding", None))
            async for chunk in self.reply(session, [("user", [features])], params, audio=False, t0=t0):
                yield chunk
        finally:
            session.close()

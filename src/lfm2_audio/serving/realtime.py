"""`/v1/realtime`: a speech-to-speech WebSocket modelled on OpenAI's Realtime API.

Client events: session.update, input_audio_buffer.append / commit / clear,
conversation.item.create, conversation.item.truncate, response.create, response.cancel.
Server events: session.created / updated, input_audio_buffer.speech_started /
speech_stopped / committed / cleared, conversation.item.created,
conversation.item.input_audio_transcription.completed / failed, response.created,
response.output_item.added / done, response.content_part.added / done,
response.audio_transcript.delta / done (or response.text.delta / done for text-only replies),
response.audio.delta / done, response.done, error.

Audio in and out is base64 16-bit mono PCM; input at 24 kHz unless the session says
`input_audio_sample_rate`, output at the codec's rate (24 kHz). With server VAD (the
default) the server decides when the user's turn ends, commits it and answers; when the
user starts talking during a reply the reply is cancelled at once (barge-in) and its queued
audio is dropped.

One connection is one conversation: one engine session (cache row) for its lifetime. Changing
`instructions` or `voice` starts a fresh conversation, since the system turn is the first
thing in the model's context.

Extensions to OpenAI's fields are documented with SessionConfig.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..errors import InputError
from ..generation.chat import VOICES
from ..generation.sampling import GREEDY, Sampling
from .audio import InputResampler, b64, decode_base64_pcm16, to_pcm16
from .engine import Features
from .reply import ReplyParams
from .runtime import Busy, ReplyStream, Runtime, chat_system_prompt
from .vad import RATE, TurnDetector, TurnSettings

log = logging.getLogger("lfm2_audio.realtime")

MIN_COMMIT_SAMPLES = RATE // 10  # OpenAI refuses to commit less than 100 ms
TAIL_SAMPLES = RATE // 5  # audio kept after the last speech chunk when VAD commits
KEEP_SAMPLES = 2 * RATE  # unspoken audio kept (beyond prefix padding) while waiting for speech
# Log-mel of a turn up to this long runs on the event loop (~1.2 ms for 2.4 s of audio): when
# many turns end together, a worker thread's round trip through the interpreter lock took
# 50-70 ms per turn (16 sessions on 2 cores); longer clips still go to a thread.
INLINE_FEATURES_SAMPLES = 8 * RATE


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class SessionConfig:
    """The session object. OpenAI fields: modalities, instructions, voice, input_audio_format,
    output_audio_format, turn_detection, input_audio_transcription, temperature,
    max_response_output_tokens. Extensions: input_audio_sample_rate (Hz of the pcm16 you
    send, default 24000), generation_mode ("interleaved" | "sequential"), task ("chat" |
    "transcribe": answer nothing, just transcribe each turn), top_k, seed."""

    modalities: list = field(default_factory=lambda: ["text", "audio"])
    instructions: str | None = None
    voice: str | None = None
    input_audio_format: str = "pcm16"
    output_audio_format: str = "pcm16"
    input_audio_sample_rate: int = 24000
    turn_detection: TurnSettings | None = field(default_factory=TurnSettings)
    input_audio_transcription: dict | None = None
    temperature: float = 1.0
    top_k: int | None = 4
    max_response_output_tokens: int | str = "inf"
    generation_mode: str = "interleaved"
    task: str = "chat"
    seed: int | None = None

    def to_dict(self, session_id: str, model: str, rate: int | None) -> dict:
        return {"id": session_id, "object": "realtime.session", "model": model, "modalities": self.modalities,
                "instructions": self.instructions or "", "voice": self.voice,
                "input_audio_format": self.input_audio_format, "output_audio_format": self.output_audio_format,
                "input_audio_sample_rate": self.input_audio_sample_rate, "output_audio_sample_rate": rate,
                "turn_detection": self.turn_detection.to_dict() if self.turn_detection else None,
                "input_audio_transcription": self.input_audio_transcription, "temperature": self.temperature,
                "top_k": self.top_k, "max_response_output_tokens": self.max_response_output_tokens,
                "generation_mode": self.generation_mode, "task": self.task, "seed": self.seed}

    def update(self, d: dict) -> None:
        """Apply a session.update's fields, all checked before any is applied."""
        new = SessionConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        known = set(self.__dataclass_fields__) | {"model", "tools", "tool_choice", "id", "object"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown session field(s): {', '.join(unknown)}")
        if "modalities" in d:
            m = d["modalities"]
            if not isinstance(m, list) or set(m) not in ({"text"}, {"text", "audio"}):
                raise InputError('modalities must be ["text"] or ["text", "audio"]')
            new.modalities = list(m)
        if "instructions" in d:
            if d["instructions"] is not None and not isinstance(d["instructions"], str):
                raise InputError("instructions must be a string")
            new.instructions = d["instructions"] or None
        if "voice" in d:
            if d["voice"] is not None and d["voice"] not in VOICES:
                raise InputError(f"voice must be one of {', '.join(VOICES)} (or null)")
            new.voice = d["voice"]
        for key in ("input_audio_format", "output_audio_format"):
            if key in d and d[key] != "pcm16":
                raise InputError(f"{key} must be pcm16 (16-bit little-endian mono PCM)")
        if "input_audio_sample_rate" in d:
            r = d["input_audio_sample_rate"]
            if isinstance(r, bool) or not isinstance(r, int) or not 8000 <= r <= 96000:
                raise InputError("input_audio_sample_rate must be an integer from 8000 to 96000")
            new.input_audio_sample_rate = r
        if "turn_detection" in d:
            td = d["turn_detection"]
            if td is None:
                new.turn_detection = None
            elif isinstance(td, dict) and td.get("type", "server_vad") == "server_vad":
                new.turn_detection = TurnSettings.from_dict(td)
            else:
                raise InputError('turn_detection must be null or {"type": "server_vad", ...}')
        if "input_audio_transcription" in d:
            t = d["input_audio_transcription"]
            if t is not None and not isinstance(t, dict):
                raise InputError("input_audio_transcription must be an object or null")
            new.input_audio_transcription = t
        if "temperature" in d:
            t = d["temperature"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2:
                raise InputError("temperature must be a number from 0 to 2")
            new.temperature = float(t)
        if "top_k" in d:
            k = d["top_k"]
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise InputError("top_k must be a positive integer or null")
            new.top_k = k
        if "max_response_output_tokens" in d:
            new.max_response_output_tokens = check_max_tokens(d["max_response_output_tokens"])
        if "generation_mode" in d:
            if d["generation_mode"] not in ("interleaved", "sequential"):
                raise InputError("generation_mode must be interleaved or sequential")
            new.generation_mode = d["generation_mode"]
        if "task" in d:
            if d["task"] not in ("chat", "transcribe"):
                raise InputError("task must be chat or transcribe")
            new.task = d["task"]
        if "seed" in d:
            if d["seed"] is not None and (isinstance(d["seed"], bool) or not isinstance(d["seed"], int)):
                raise InputError("seed must be an integer or null")
            new.seed = d["seed"]
        self.__dict__.update(new.__dict__)


def check_max_tokens(v):
    if v == "inf":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError('max_response_output_tokens must be a positive integer or "inf"')
    return v


class AudioBuffer:
    """The user's audio at 16 kHz since the last commit, addressed by absolute sample index
    (samples since the connection opened), which is also how VAD decisions are reported."""

    def __init__(self):
        self.parts: list[np.ndarray] = []
        self.start = 0  # absolute index of the first sample held
        self.end = 0  # absolute index after the last sample held

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self.parts.append(samples)
            self.end += samples.size

    def take(self, a: int, b: int) -> np.ndarray:
        """Samples [a, b) (clipped to what is held); everything before b is dropped."""
        a, b = max(a, self.start), min(b, self.end)
        whole = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        out = whole[a - self.start : max(a, b) - self.start].copy()
        self.parts = [whole[max(a, b) - self.start :]] if b < self.end else []
        self.start = max(self.start, b)
        return out

    def drop_before(self, a: int) -> None:
        """Forget samples before a (called on every append: whole pieces go without copying)."""
        a = min(a, self.end)
        while self.parts and self.start + self.parts[0].size <= a:
            self.start += self.parts.pop(0).size
        if self.parts and self.start < a:
            self.parts[0] = self.parts[0][a - self.start :]
            self.start = a

    def clear(self) -> None:
        self.parts, self.start = [], self.end

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class ActiveResponse:
    id: str
    item_id: str
    audio: bool
    stream: ReplyStream | None = None
    task: asyncio.Task | None = None
    cancelled: bool = False
    cancel_reason: str | None = None
    t_cancel: float | None = None
    transcript: list = field(default_factory=list)


class RealtimeConnection:
    def __init__(self, ws: WebSocket, rt: Runtime):
        self.ws, self.rt = ws, rt
        self.id = new_id("sess")
        chat = rt.lfm.audio_sampling["chat"]  # the model's default audio sampling
        self.config = SessionConfig(temperature=chat.temperature, top_k=chat.top_k)
        self.session = None  # the engine session holding this conversation
        self.system: str | None = None
        self.out: asyncio.Queue = asyncio.Queue()
        self.out_bytes = 0
        self.skip: set[str] = set()  # responses whose queued audio must not be sent any more
        self.response: ActiveResponse | None = None
        self.want_response = False  # a turn ended while a reply was running
        self.pending: list = []  # turns added since the last response
        self.last_item: str | None = None
        self.buffer = AudioBuffer()
        self.resampler = InputResampler(self.config.input_audio_sample_rate, RATE)
        self.vad = None
        self.detector: TurnDetector | None = None
        self.speech_item: str | None = None
        self.turn_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        self.aborted = False  # we gave up on a client that does not read
        self.task: asyncio.Task | None = None
        self.t_turn_end: float | None = None  # when the user's last turn was committed
        self.loop = asyncio.get_running_loop()

    # ---- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        self.task = asyncio.current_task()
        await self.ws.accept()
        sender = asyncio.create_task(self._sender())
        self.rt.connections.add(self)
        try:
            try:
                await self._open_conversation()
            except Busy as e:
                self.send_error(str(e), code="server_busy", type="server_error")
                await self._flush_and_close(1013, "server busy")
                return
            self._setup_vad()
            self.send({"type": "session.created", "session": self._session_dict()})
            try:
                await self._receive()
            except asyncio.CancelledError:
                if not self.aborted:  # cancelled from outside (server stopping): propagate
                    raise
        finally:
            self.closing = True
            self.rt.connections.discard(self)
            if self.response is not None and self.response.stream is not None:
                self.response.stream.cancel()
            for t in list(self.tasks):
                t.cancel()
            if self.vad is not None:
                self.vad.close()
            if self.session is not None:
                self.session.close()
            sender.cancel()
            # let it finish cancelling: if the loop stops right after (server shutdown), a
            # still-pending task would be destroyed with an error in the log
            try:
                await asyncio.gather(sender, return_exceptions=True)
            except asyncio.CancelledError:
                pass  # cancelled again meanwhile; an exception already on its way still propagates

    async def _open_conversation(self) -> None:
        system = chat_system_prompt(self.config.instructions, self.config.voice)
        if self.session is not None:
            self.session.close()
            self.session = None
        self.session = await self.rt.open_session(system)
        self.system = system

    def server_closing(self) -> None:
        """The server drains: say so; the reply in progress may finish."""
        self.send_error("the server is shutting down; the current response may finish, then the connection closes",
                        code="server_shutting_down", type="server_error")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._flush_and_close(code, reason)

    async def _flush_and_close(self, code: int, reason: str) -> None:
        self.closing = True
        deadline = time.monotonic() + 1.0
        while not self.out.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.close(code, reason)
        except Exception:  # already gone
            pass

    # ---- sending ----------------------------------------------------------------------------

    def send(self, event: dict, tag: str | None = None) -> None:
        """Queue an event; the sender task writes it. `tag` (a response id) lets a cancelled
        response's queued audio be dropped."""
        event = {"event_id": new_id("event"), **event}
        text = json.dumps(event)
        self.out_bytes += len(text)
        self.out.put_nowait((text, tag))
        if self.out_bytes > self.rt.config.max_backlog_bytes and not self.closing:
            self._drop_slow_client()

    def send_error(self, message: str, code: str, type: str = "invalid_request_error", event_id=None, param=None) -> None:
        self.rt.metrics.errors.inc(code=code)
        self.send({"type": "error", "error": {"type": type, "code": code, "message": message, "param": param,
                                              "event_id": event_id}})

    async def _sender(self) -> None:
        try:
            while True:
                text, tag = await self.out.get()
                self.out_bytes -= len(text)
                if tag is not None and tag in self.skip:
                    continue
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that
                    # lands as the send completes, and this task then waited on the empty queue
                    # forever, holding its connection's handler open (and the server's shutdown).
                    async with asyncio.timeout(self.rt.config.send_timeout):
                        await self.ws.send_text(text)
                except TimeoutError:
                    self._drop_slow_client()
                    return
                except Exception:  # the client is gone; the receiver will notice
                    return
        except asyncio.CancelledError:
            pass

    def _drop_slow_client(self) -> None:
        """A client that does not read: stop its reply, free its session, close."""
        if self.closing:
            return
        self.closing = True
        log.warning("realtime client %s is not reading; closing", self.id)
        self.rt.metrics.errors.inc(code="slow_client")
        if self.response is not None and self.response.stream is not None:
            self.response.stream.cancel()
        if self.session is not None:
            self.session.close()
            self.session = None
        self._spawn(self._abort(1008, "client too slow: messages not read"))

    async def _abort(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self.ws.close(code, reason)
        except Exception:
            pass
        # A client that reads nothing cannot complete the close handshake either: stop
        # waiting for its messages so the connection's state is released now.
        self.aborted = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    # ---- receiving --------------------------------------------------------------------------

    async def _receive(self) -> None:
        handlers = {
            "session.update": self.on_session_update,
            "input_audio_buffer.append": self.on_append,
            "input_audio_buffer.commit": self.on_commit,
            "input_audio_buffer.clear": self.on_clear,
            "conversation.item.create": self.on_item_create,
            "conversation.item.truncate": self.on_item_truncate,
            "response.create": self.on_response_create,
            "response.cancel": self.on_response_cancel,
        }
        while not self.closing:
            try:
                msg = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is None:
                self.send_error("binary messages are not supported: send JSON events as text", code="invalid_event")
                continue
            try:
                event = json.loads(msg["text"])
            except json.JSONDecodeError as e:
                self.send_error(f"message is not valid JSON: {e}", code="invalid_json")
                continue
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                self.send_error("an event must be a JSON object with a string 'type'", code="invalid_event")
                continue
            handler = handlers.get(event["type"])
            if handler is None:
                self.send_error(f"unknown event type {event['type']!r}", code="unknown_event",
                                event_id=event.get("event_id"))
                continue
            try:
                await handler(event)
            except InputError as e:
                self.send_error(str(e), code="invalid_value", event_id=event.get("event_id"))
            except Busy as e:
                self.send_error(str(e), code="server_busy", type="server_error", event_id=event.get("event_id"))

    # ---- session ----------------------------------------------------------------------------

    def _session_dict(self) -> dict:
        return self.config.to_dict(self.id, self.rt.config.model_name, self.rt.codec.sample_rate)

    async def on_session_update(self, event: dict) -> None:
        s = event.get("session")
        if not isinstance(s, dict):
            raise InputError("session.update needs a 'session' object")
        old_rate = self.config.input_audio_sample_rate
        old_vad = self.config.turn_detection
        self.config.update(s)
        if self.config.input_audio_sample_rate != old_rate:
            self.resampler = InputResampler(self.config.input_audio_sample_rate, RATE)
        system = chat_system_prompt(self.config.instructions, self.config.voice)
        if system != self.system:
            if self.response is not None:
                self._cancel_response("client_cancelled")
                await self._wait_response()
            await self._open_conversation()
            self.pending = []
        if (old_vad is None) != (self.config.turn_detection is None) or self.config.turn_detection != old_vad:
            self._setup_vad()
        self.send({"type": "session.updated", "session": self._session_dict()})

    def _setup_vad(self) -> None:
        if self.vad is not None:
            self.vad.close()
            self.vad = None
        settings = self.config.turn_detection
        if settings is None or self.rt.vad is None:
            self.detector = None
            return
        self.detector = TurnDetector(settings)
        inbox = self.rt.inbox(self.loop)
        self.vad = self.rt.vad.stream(lambda p, end: inbox.post(self._on_vad, p, end))
        self.vad.samples = self.buffer.end  # decisions come back in absolute sample indices

    # ---- input audio ------------------------------------------------------------------------

    async def on_append(self, event: dict) -> None:
        wave = decode_base64_pcm16(event.get("audio"))
        if not wave.size:
            return
        samples = self.resampler(wave)
        self.buffer.append(samples)
        if self.vad is not None:
            self.vad.feed(samples)
            if not self.detector.speaking:  # keep only what a coming turn could still need
                keep = self.detector.settings.prefix_padding_ms * RATE // 1000 + KEEP_SAMPLES
                self.buffer.drop_before(self.buffer.end - keep)
        if self.buffer.size > self.rt.config.max_input_seconds * RATE:
            self.buffer.clear()
            if self.detector is not None:
                self.detector.reset()
            raise InputError(f"input audio buffer over {self.rt.config.max_input_seconds:g} s: cleared")

    async def on_commit(self, event: dict) -> None:
        if self.buffer.size < MIN_COMMIT_SAMPLES:
            self.send_error(f"buffer too small: {self.buffer.size / RATE * 1000:.0f} ms of audio, need at least 100 ms",
                            code="input_audio_buffer_commit_empty", event_id=event.get("event_id"))
            return
        if self.detector is not None:
            self.detector.reset()
        async with self.turn_lock:
            await self._commit(self.buffer.start, self.buffer.end, new_id("item"))

    async def on_clear(self, event: dict) -> None:
        self.buffer.clear()
        if self.detector is not None:
            self.detector.reset()
        self.send({"type": "input_audio_buffer.cleared"})

    def _on_vad(self, prob: float, end: int) -> None:
        if self.closing or self.detector is None:
            return
        decision = self.detector.update(prob, end)
        if decision == "started":
            self.speech_item = new_id("item")
            self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": self.detector.start * 1000 // RATE,
                       "item_id": self.speech_item})
            r = self.response
            if r is not None and not r.cancelled and self.detector.settings.interrupt_response:
                self.rt.metrics.barge_ins.inc()
                self._cancel_response("turn_detected")
        elif decision == "stopped":
            item = self.speech_item or new_id("item")
            self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": self.detector.last_speech * 1000 // RATE,
                       "item_id": item})
            prefix = self.detector.settings.prefix_padding_ms * RATE // 1000
            start, stop = self.detector.start - prefix, self.detector.last_speech + TAIL_SAMPLES
            self._spawn(self._vad_turn(start, stop, item))

    async def _vad_turn(self, start: int, stop: int, item: str) -> None:
        async with self.turn_lock:
            if not await self._commit(start, stop, item):
                return
            settings = self.config.turn_detection
            if self.config.task == "chat" and settings is not None and settings.create_response:
                if self.response is not None:
                    self.want_response = True
                else:
                    await self._start_response({})

    async def _commit(self, start: int, stop: int, item_id: str) -> bool:
        wave = self.buffer.take(start, stop)
        t_commit = time.perf_counter()
        if wave.size < MIN_COMMIT_SAMPLES:
            return False
        self.send({"type": "input_audio_buffer.committed", "previous_item_id": self.last_item, "item_id": item_id})
        self.send({"type": "conversation.item.created", "previous_item_id": self.last_item,
                   "item": {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                            "status": "completed", "content": [{"type": "input_audio", "transcript": None}]}})
        self.last_item = item_id
        try:
            feats = await self._features(wave)
        except InputError as e:
            self.send_error(f"cannot use this audio: {e}", code="invalid_audio")
            return False
        if self.config.task == "transcribe" or self.config.input_audio_transcription is not None:
            self._spawn(self._transcribe(item_id, feats, t_commit))
        if self.config.task == "chat":
            self.pending.append(("user", [feats]))
            self.t_turn_end = t_commit
        return True

    async def _features(self, wave) -> Features:
        if wave.size <= INLINE_FEATURES_SAMPLES:
            return self.rt.engine.features_16k(wave)
        return await asyncio.to_thread(self.rt.engine.features_16k, wave)

    async def _transcribe(self, item_id: str, feats: Features, t0: float) -> None:
        text = []
        try:
            async for c in self.rt.transcribe(feats, t0=t0):
                if c.kind == "text":
                    text.append(c.text)
                    self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item_id,
                               "content_index": 0, "delta": c.text})
                elif c.kind == "error":
                    raise InputError(c.text)
        except (Busy, InputError) as e:
            self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item_id,
                       "content_index": 0, "error": {"type": "transcription_error", "code": "transcription_failed",
                                                     "message": str(e)}})
            return
        self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                   "content_index": 0, "transcript": "".join(text).strip()})

    # ---- conversation items -----------------------------------------------------------------

    async def on_item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise InputError("conversation.item.create needs an item of type 'message'")
        role = item.get("role")
        if role not in ("user", "assistant", "system"):
            raise InputError("item.role must be user, assistant or system")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise InputError("item.content must be a non-empty list")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "text") and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "input_audio" and role == "user":
                wave = decode_base64_pcm16(part.get("audio"))
                wave = InputResampler(self.config.input_audio_sample_rate, RATE)(wave)
                parts.append(await self._features(wave))
            else:
                raise InputError(f"unsupported content part {kind!r} for role {role}")
        item_id = item.get("id") or new_id("item")
        self.pending.append((role, parts))
        self.send({"type": "conversation.item.created", "previous_item_id": self.last_item,
                   "item": {"id": item_id, "object": "realtime.item", "type": "message", "role": role,
                            "status": "completed", "content": [{"type": "input_text", "text": p} if isinstance(p, str)
                                                               else {"type": "input_audio", "transcript": None}
                                                               for p in parts]}})
        self.last_item = item_id

    async def on_item_truncate(self, event: dict) -> None:
        # The client tells how much of a reply it played before an interruption. The model's
        # context keeps the whole reply (cutting a cache mid-turn is not supported); we confirm.
        self.send({"type": "conversation.item.truncated", "item_id": event.get("item_id"),
                   "content_index": event.get("content_index", 0), "audio_end_ms": event.get("audio_end_ms", 0)})

    # ---- responses --------------------------------------------------------------------------

    async def on_response_create(self, event: dict) -> None:
        if self.response is not None:
            self.send_error("conversation already has an active response", code="conversation_already_has_active_response",
                            event_id=event.get("event_id"))
            return
        opts = event.get("response") or {}
        if not isinstance(opts, dict):
            raise InputError("response must be an object")
        await self._start_response(opts)

    async def on_response_cancel(self, event: dict) -> None:
        if self.response is None or self.response.cancelled:
            self.send_error("there is no active response to cancel", code="response_cancel_not_active",
                            event_id=event.get("event_id"))
            return
        self._cancel_response("client_cancelled")

    async def _start_response(self, opts: dict) -> None:
        if self.session is None:
            raise InputError("the conversation is closed")
        c = self.config
        modalities = opts.get("modalities", c.modalities)
        if not isinstance(modalities, list) or set(modalities) not in ({"text"}, {"text", "audio"}):
            raise InputError('response.modalities must be ["text"] or ["text", "audio"]')
        audio = "audio" in modalities and self.rt.has_audio_output
        limit = check_max_tokens(opts.get("max_output_tokens", opts.get("max_response_output_tokens",
                                                                          c.max_response_output_tokens)))
        temperature = opts.get("temperature", c.temperature)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise InputError("temperature must be a number")
        audio_sampling = Sampling(float(temperature), c.top_k)
        params = ReplyParams(mode=c.generation_mode if audio else "sequential", text_sampling=GREEDY,
                             audio_sampling=audio_sampling,
                             max_new_tokens=self.rt.clamp_tokens(None if limit == "inf" else limit),
                             seed=c.seed, stop_at_audio=not audio)
        turns, self.pending = self.pending, []
        r = ActiveResponse(new_id("resp"), new_id("item"), audio)
        t0 = self.t_turn_end or time.perf_counter()
        self.t_turn_end = None
        r.stream = self.rt.reply(self.session, turns, params, audio=audio, t0=t0)
        self.response = r
        self.send({"type": "response.created", "response": self._response_dict(r, "in_progress")})
        self.send({"type": "response.output_item.added", "response_id": r.id, "output_index": 0,
                   "item": {"id": r.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                            "status": "in_progress", "content": []}})
        self.send({"type": "response.content_part.added", "response_id": r.id, "item_id": r.item_id,
                   "output_index": 0, "content_index": 0,
                   "part": {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}})
        self.last_item = r.item_id
        r.task = self._spawn(self._run_response(r))

    def _response_dict(self, r: ActiveResponse, status: str, details=None, usage=None) -> dict:
        out = {"id": r.id, "object": "realtime.response", "status": status, "status_details": details,
               "output": [] if status == "in_progress" else [self._item_dict(r, status)],
               "modalities": ["text", "audio"] if r.audio else ["text"]}
        if usage is not None:
            out["usage"] = usage
        return out

    def _item_dict(self, r: ActiveResponse, status: str) -> dict:
        text = "".join(r.transcript)
        part = {"type": "audio", "transcript": text} if r.audio else {"type": "text", "text": text}
        return {"id": r.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "completed" if status == "completed" else "incomplete", "content": [part]}

    def _cancel_response(self, reason: str) -> None:
        r = self.response
        if r is None or r.cancelled:
            return
        r.cancelled, r.cancel_reason, r.t_cancel = True, reason, time.perf_counter()
        self.skip.add(r.id)  # queued audio of this reply is not sent any more
        r.stream.cancel()

    async def _wait_response(self) -> None:
        r = self.response
        if r is not None and r.task is not None:
            try:
                async with asyncio.timeout(5.0):
                    await asyncio.wait({r.task})  # neither cancels it nor raises its outcome
            except TimeoutError:
                pass

    async def _run_response(self, r: ActiveResponse) -> None:
        rate = self.rt.codec.sample_rate
        delta_type = "response.audio_transcript.delta" if r.audio else "response.text.delta"
        end, error = None, None
        try:
            async for c in r.stream:
                if c.kind == "text":
                    r.transcript.append(c.text)
                    if not r.cancelled:
                        self.send({"type": delta_type, "response_id": r.id, "item_id": r.item_id, "output_index": 0,
                                   "content_index": 0, "delta": c.text}, tag=r.id)
                elif c.kind == "audio" and c.audio is not None and c.audio.size and not r.cancelled:
                    self.rt.metrics.audio_seconds.inc(c.audio.size / rate)
                    self.send({"type": "response.audio.delta", "response_id": r.id, "item_id": r.item_id,
                               "output_index": 0, "content_index": 0, "delta": b64(to_pcm16(c.audio))}, tag=r.id)
                elif c.kind == "error":
                    error = c
                elif c.kind == "end":
                    end = c.reason
        except asyncio.CancelledError:
            return
        finally:
            if self.response is r:
                self.response = None
        if r.t_cancel is not None:
            self.rt.metrics.barge_in_latency.observe(time.perf_counter() - r.t_cancel)
        transcript = "".join(r.transcript)
        if error is not None:
            status, details = "failed", {"type": "failed", "error": {"type": "server_error", "code": error.code,
                                                                      "message": error.text}}
            self.send_error(error.text, code=error.code or "response_failed", type="server_error")
            if self.session is not None and self.session.broken:
                # The conversation cannot go on (e.g. its context is full): start a new one.
                await self._reset_conversation()
        elif r.cancelled or end in ("cancelled", "shutdown", "slow_client"):
            status, details = "cancelled", {"type": "cancelled", "reason": r.cancel_reason or end}
        elif end in ("max_new_tokens", "context_limit"):
            status, details = "incomplete", {"type": "incomplete",
                                             "reason": "max_output_tokens" if end == "max_new_tokens" else "context_limit"}
        else:
            status, details = "completed", None
        if status != "cancelled" and status != "failed":
            if r.audio:
                self.send({"type": "response.audio.done", "response_id": r.id, "item_id": r.item_id,
                           "output_index": 0, "content_index": 0})
                self.send({"type": "response.audio_transcript.done", "response_id": r.id, "item_id": r.item_id,
                           "output_index": 0, "content_index": 0, "transcript": transcript})
            else:
                self.send({"type": "response.text.done", "response_id": r.id, "item_id": r.item_id,
                           "output_index": 0, "content_index": 0, "text": transcript})
            self.send({"type": "response.content_part.done", "response_id": r.id, "item_id": r.item_id,
                       "output_index": 0, "content_index": 0, "part": self._item_dict(r, status)["content"][0]})
            self.send({"type": "response.output_item.done", "response_id": r.id, "output_index": 0,
                       "item": self._item_dict(r, status)})
        req = r.stream.request
        reply = req.reply
        usage = {"input_tokens": req.prompt_positions,
                 "output_tokens": (reply.tokens + reply.frames) if reply is not None else 0,
                 "output_token_details": {"text_tokens": reply.tokens if reply else 0,
                                          "audio_frames": reply.frames if reply else 0}}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        self.send({"type": "response.done", "response": self._response_dict(r, status, details, usage)})
        self.rt.metrics.requests.inc(endpoint="realtime", status=status)
        if self.want_response and not self.closing:
            self.want_response = False
            await self._start_response({})

    async def _reset_conversation(self) -> None:
        try:
            await self._open_conversation()
            self.pending = []
        except Busy:
            self.session = None

"""The serving engine: many conversations on one loaded model, batched step by step.

One background thread owns the model and a slot cache (serving/slots.py) with one row per
session. Each iteration it
  1. applies the commands other threads posted (open, submit, cancel, close, stop),
  2. prefills queued prompt positions of every waiting session in one batched call (their
     rows moved side by side after the decoding block), for at most `prefill_budget` seconds
     while others are decoding (the number of positions that fits is learnt as it runs), so a
     long prompt never stalls the others' audio for long; with nobody decoding, everything
     waiting runs at once,
  3. takes one decode step for every session that is replying: one batched text-head pass
     for the rows in text mode, batched depthformer frames for the rows in audio mode (rows
     grouped by sampling settings; a row with its own seed samples alone so its random draws
     are its own), then one batched backbone step over the packed block of decoding rows,
  4. advances each beam-searched transcript (ReplyParams.asr_decoding; generation/beam.py) by
     one backbone call over rows of its own: its first call encodes the clip and runs the
     whole prompt, each later one extends every hypothesis by a token.
Each reply's switching rules and bookkeeping are `ReplyMachine`'s (generate()'s loop), so a
session produces what `generate` would on the same conversation.

Events (generation.generate.Event: "text", "audio", then exactly one "end") go to each
request's `sink`, called on the engine thread: a sink must not block (the server's hands them
to an asyncio queue). A failure sends Event("error", reason=message, text=code) before the
end (reason "error"); codes: "invalid_request" (the caller's input, e.g. over the context
limit) and "internal_error". End reasons are generate()'s plus "cancelled", "error" and
"shutdown".

Admission control: at most `max_sessions` open sessions (open_session raises EngineFull) and
at most `max_context` positions per session. Closing a session frees its row at the next
iteration, within one decode step.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from ..audio.features import user_features
from ..audio.io import load_audio
from ..config import MODALITY_AUDIO_OUT
from ..errors import InputError
from ..generation.beam import beam_search
from ..generation.chat import Conversation, embed_pending
from ..generation.generate import Event
from ..generation.sampling import Sampling, sample
from .reply import ReplyMachine, ReplyParams
from .slots import SlotCache

log = logging.getLogger("lfm2_audio.engine")


class EngineError(Exception):
    """The engine cannot take the request (full, stopped); not the caller's input's fault."""


class EngineFull(EngineError):
    pass


class EngineClosed(EngineError):
    pass


@dataclass
class EngineStats:
    """Counters read by the metrics endpoint (plain ints and floats: reads need no lock)."""

    steps: int = 0
    step_rows: int = 0
    step_seconds: float = 0.0
    prefill_positions: int = 0
    prefill_seconds: float = 0.0
    prefill_calls: int = 0  # batched backbone calls
    prefill_rows: int = 0  # rows over those calls (rows / calls: how many prefilled together)
    tokens: int = 0
    frames: int = 0
    requests: int = 0
    cancelled: int = 0
    failed: int = 0
    decoding: int = 0
    prefilling: int = 0


@dataclass
class Features:
    """Log-mel features of a clip, computed off the engine thread (see Engine.features)."""

    value: torch.Tensor  # [n_mels, T]


class Request:
    """One reply in flight. `sink(event)` receives its events on the engine thread."""

    _ids = itertools.count(1)

    def __init__(self, session: "Session", turns, params: ReplyParams, sink: Callable[[Event], None]):
        self.id = next(self._ids)
        self.session, self.turns, self.params, self.sink = session, turns, params, sink
        self.t_submit = time.perf_counter()
        self.t_first_token: float | None = None
        self.t_first_frame: float | None = None
        self.t_end: float | None = None
        self.done = False
        self.reason: str | None = None
        self.reply: ReplyMachine | None = None
        self.search = None  # a searched transcript's generator (generation/beam.py)
        self.prompt_positions = 0  # positions this request's prefill ran

    def cancel(self) -> None:
        """Stop the reply; its "end" event (reason "cancelled") follows within one step."""
        self.session.engine._post("cancel", self)


class Session:
    """A conversation holding one cache row of the engine until closed."""

    _ids = itertools.count(1)

    def __init__(self, engine: "Engine", conv: Conversation):
        self.id = next(self._ids)
        self.engine, self.conv = engine, conv
        self.row: int | None = None
        self.state = "opening"  # opening | idle | prefill | decode | search | closed
        self.active: Request | None = None
        self.waiting: deque[Request] = deque()
        self.prefill_emb: torch.Tensor | None = None
        self.broken: str | None = None  # set after a failure that left the cache unusable
        self.closed = False

    def submit(self, turns, params: ReplyParams, sink: Callable[[Event], None]) -> Request:
        """Queue turns ([(role, [str | Features | audio ...])]) and a reply to them.

        Requests of one session run one after another."""
        if self.closed:
            raise EngineClosed("session is closed")
        req = Request(self, list(turns), params, sink)
        self.engine._post("submit", req)
        return req

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine._post("close", self)


def engine_limits(model, max_sessions: int, max_context: int) -> tuple[int, int]:
    """Checked (sessions, positions per session), the context capped at the model's."""
    if max_sessions < 1:
        raise InputError("max_sessions must be at least 1")
    if max_context < 16:
        raise InputError("max_context must be at least 16")
    return int(max_sessions), int(min(max_context, model.cfg.max_context))


class Engine:
    # Why the engine can no longer serve, once it cannot (an engine on a thread fails at start,
    # raising; EngineProcess sets it when its child dies).
    failure: str | None = None

    def __init__(self, model, tokenizer, max_sessions: int = 16, max_context: int = 4096,
                 prefill_chunk: int = 2048, prefill_budget: float = 0.1,
                 on_slot_freed: Callable[[], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_sessions, self.max_context = engine_limits(model, max_sessions, max_context)
        self.prefill_chunk = int(prefill_chunk)  # positions per backbone call, at most
        self.prefill_budget = float(prefill_budget)
        self._prefill_rate = None  # seconds per prefill position, a running average
        self.on_slot_freed = on_slot_freed
        self.stats = EngineStats()
        self.step_observers: list[Callable[[float, int], None]] = []
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._open = 0  # sessions opened and not yet released (admission count)
        self._active_requests = 0
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        # Engine-thread state.
        self.slots: SlotCache | None = None
        self.rows: list[Session | None] = [None] * self.max_sessions
        self.n_decode = 0
        self.prefill_queue: deque[Session] = deque()
        self.searches: list[Session] = []  # sessions whose reply is a beam-searched transcript

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lfm2-engine", daemon=True)
            self._thread.start()
            self._ready.wait()
            if self._failure is not None:
                raise self._failure
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what runs (reason "shutdown") and end the thread."""
        with self._lock:
            self._stopped = True
        if self._thread is not None:
            self._post("stop", None)
            self._thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def open_sessions(self) -> int:
        return self._open

    @property
    def active_requests(self) -> int:
        return self._active_requests

    # ---- thread-safe API --------------------------------------------------------------------

    def open_session(self, system: str | None = None, max_context: int | None = None) -> Session:
        """A new conversation (with `system` as its system turn) on a free row; raises
        EngineFull when every row is taken and EngineClosed once stopping."""
        session = Session(self, self._admit(system, max_context))
        self._post("open", session)
        return session

    def _admit(self, system: str | None, max_context: int | None) -> Conversation:
        """Count a new session in (or refuse it) and make its conversation; the count is given
        back if the conversation cannot be made (a system prompt over the limit, ...)."""
        limit = self.max_context if max_context is None else min(int(max_context), self.max_context)
        if limit < 16:
            raise InputError("max_context must be at least 16 positions")
        with self._lock:
            if self._stopped or self.failure:
                raise EngineClosed(self.failure or "the engine is shutting down")
            if self._open >= self.max_sessions:
                raise EngineFull(f"all {self.max_sessions} sessions are in use")
            self._open += 1
        try:
            return Conversation(self.model, self.tokenizer, system=system, max_context=limit)
        except BaseException:
            self._release_admission()
            raise

    def features(self, audio, sample_rate: int | None = None) -> Features:
        """Log-mel features of user audio (any thread): a path, bytes, file or array."""
        pre = self.model.cfg.preprocessor
        wave = load_audio(audio, sample_rate=sample_rate, target_rate=pre.sample_rate)
        return self.features_16k(wave)

    def features_16k(self, wave) -> Features:
        """Log-mel features of mono float32 audio already at the model's input rate."""
        return Features(user_features(wave, self.model.cfg.preprocessor))

    def _post(self, kind: str, item) -> None:
        self._commands.put((kind, item))
        self._wake.set()

    def _release_admission(self) -> None:
        with self._lock:
            self._open -= 1
        if self.on_slot_freed is not None:
            try:
                self.on_slot_freed()
            except Exception:  # a notifier must never take the engine down
                log.exception("on_slot_freed failed")

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self.slots = SlotCache(self.model.lfm, self.max_sessions, self.max_context)
        except BaseException as e:  # e.g. out of memory for the cache
            self._failure = e
            self._ready.set()
            return
        self._ready.set()
        with torch.inference_mode():
            while True:
                if not self._apply_commands():
                    break
                worked = False
                if self.prefill_queue:
                    self._prefill()
                    worked = True
                if self.n_decode:
                    self._decode_step()
                    worked = True
                if self.searches:
                    self._search_step()
                    worked = True
                self.stats.decoding, self.stats.prefilling = self.n_decode, len(self.prefill_queue)
                if not worked:
                    self._wake.wait(0.5)
                    self._wake.clear()
        self._shutdown()

    def _apply_commands(self) -> bool:
        while True:
            try:
                kind, item = self._commands.get_nowait()
            except queue.Empty:
                return True
            try:
                if kind == "stop":
                    return False
                getattr(self, f"_cmd_{kind}")(item)
            except Exception:
                log.exception("engine command %s failed", kind)

    def _cmd_open(self, s: Session) -> None:
        if s.closed:  # closed before it was placed
            self._release_admission()
            return
        r = next(i for i in range(self.n_decode, self.max_sessions) if self.rows[i] is None)
        self.rows[r], s.row, s.state = s, r, "idle"
        self.slots.clear(r)

    def _cmd_submit(self, req: Request) -> None:
        s = req.session
        with self._lock:
            self._active_requests += 1
        self.stats.requests += 1
        if s.state == "closed":
            self._fail(req, "session is closed")
            return
        s.waiting.append(req)
        if s.active is None:
            self._start_next(s)

    def _cmd_cancel(self, req: Request) -> None:
        s = req.session
        if req.done:
            return
        if req in s.waiting:
            s.waiting.remove(req)
            self._emit_end(req, [Event("end", reason="cancelled")], cancelled=True)
            return
        if s.active is not req:
            return
        if s.state == "prefill":
            # The cache must hold every position the conversation counts, so the prefill runs
            # to its end quietly; the client hears "cancelled" now.
            self._emit_end(req, [Event("end", reason="cancelled")], cancelled=True)
        elif s.state == "decode":
            events = req.reply.finish("cancelled")
            self._leave_decode(s)
            self._emit_end(req, events, cancelled=True)
            self._reply_finished(s)
        elif s.state == "search":
            self._end_search(s)
            self._emit_end(req, [Event("end", reason="cancelled")], cancelled=True)
            self._reply_finished(s)

    def _cmd_close(self, s: Session) -> None:
        if s.state == "opening":  # never placed: _cmd_open will see `closed`
            return
        if s.state == "closed":
            return
        reqs = ([s.active] if s.active is not None else []) + list(s.waiting)
        if s.state == "decode":
            self._leave_decode(s)
        if s.state == "prefill" and s in self.prefill_queue:
            self.prefill_queue.remove(s)
        if s.state == "search":
            self._end_search(s)
        for req in reqs:
            if not req.done:
                self._emit_end(req, [Event("end", reason="cancelled")], cancelled=True)
        s.active, s.waiting, s.state, s.prefill_emb = None, deque(), "closed", None
        self.slots.clear(s.row)
        self.rows[s.row], s.row = None, None
        self._release_admission()

    # ---- starting and ending replies --------------------------------------------------------

    def _start_next(self, s: Session) -> None:
        """Take the session's next request: queue its turns, then prefill."""
        while s.waiting and s.active is None:
            req = s.waiting.popleft()
            if s.broken:
                self._fail(req, s.broken)
                continue
            try:
                conv = s.conv
                for role, contents in req.turns:
                    conv.new_turn(role)
                    for c in contents:
                        if isinstance(c, str):
                            conv.add_text(c)
                        elif isinstance(c, Features):
                            conv.add_features(c.value)
                        else:
                            conv.add_audio(c)
                    conv.end_turn()
                if req.params.searched:
                    conv.new_turn("assistant")
                    req.search = beam_search(conv, req.params.asr_decoding, req.params.max_new_tokens)
                    s.active, s.state = req, "search"
                    self.searches.append(s)
                    continue
                reply = ReplyMachine(conv, req.params)
                reply.open_turn()
            except InputError as e:
                # A turn that does not fit leaves a half-queued prompt behind: the conversation
                # cannot go on, but its error is the caller's to see.
                s.broken = f"conversation unusable after an earlier error: {e}"
                self._fail(req, str(e), code="invalid_request")
                continue
            except Exception as e:  # internal failure: report, keep serving
                log.exception("prefill preparation failed")
                self._fail_internal(s, req, e)
                continue
            # Embedded (audio through the encoder) by _embed_new, together with every other
            # turn that arrived meanwhile.
            req.reply, req.prompt_positions = reply, sum(p.positions for p in conv.pending)
            s.active, s.prefill_emb, s.state = req, None, "prefill"
            self.prefill_queue.append(s)

    # ---- searched transcripts ---------------------------------------------------------------

    def _search_step(self) -> None:
        """One backbone call of each beam search in flight (its own rows, not the slot cache),
        so a transcript never holds the others' audio up for longer than that."""
        for s in list(self.searches):
            req = s.active
            try:
                next(req.search)
                continue
            except StopIteration as done:
                ids = done.value
                self._end_search(s)
                self.stats.tokens += len(ids)
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                self._emit_end(req, ([Event("text", text=text)] if text else []) + [Event("end", reason="end_of_turn")])
            except InputError as e:
                self._end_search(s)
                self._fail(req, str(e), code="invalid_request")
            except Exception as e:  # internal failure: report, keep serving
                log.exception("transcript search failed")
                self._end_search(s)
                self._fail_internal(s, req, e)
            self._reply_finished(s)

    def _end_search(self, s: Session) -> None:
        self.searches.remove(s)
        s.active.search.close()
        # The search ran the turn in rows of its own: the session's cache row lacks it.
        s.broken = s.broken or "a session that answered with a searched transcript takes no more turns"

    def _embed_new(self) -> None:
        """Embed the prompts of the sessions that joined the prefill queue since the last call,
        their audio clips in one encoder batch."""
        new = [s for s in self.prefill_queue if s.prefill_emb is None]
        if not new:
            return
        try:
            embedded = embed_pending([s.conv for s in new])
        except Exception as e:  # internal failure (e.g. the encoder): report, keep serving
            log.exception("prefill preparation failed")
            self._fail_prefills(new, e)
            return
        for s, emb in zip(new, embedded):
            s.prefill_emb = emb

    def _fail_prefills(self, sessions: list[Session], e: Exception) -> None:
        """Sessions in the prefill queue whose turn an internal error ended: out of the queue,
        the error to their callers, their next requests started (and refused: broken)."""
        for s in sessions:
            self.prefill_queue.remove(s)
            s.prefill_emb = None
            self._fail_internal(s, s.active, e)
            self._reply_finished(s)

    def _reply_finished(self, s: Session) -> None:
        s.active, s.state = None, "idle"
        self._start_next(s)

    def _fail(self, req: Request, message: str, code: str = "error") -> None:
        self.stats.failed += 1
        self._emit_end(req, [Event("error", reason=message, text=code), Event("end", reason="error")])

    def _fail_internal(self, s: Session, req: Request, e: Exception) -> None:
        """An internal error ended `req`: its caller hears it, and the conversation (whose cache
        may be half written) takes no more turns."""
        s.broken = f"conversation unusable after an internal error: {e}"
        self._fail(req, f"internal error: {e}", code="internal_error")

    def _emit(self, req: Request, events) -> None:
        if req.done:
            return
        now = None
        for e in events:
            if e.kind == "text" and req.t_first_token is None:
                req.t_first_token = now = now or time.perf_counter()
            elif e.kind == "audio" and req.t_first_frame is None:
                req.t_first_frame = now = now or time.perf_counter()
            try:
                req.sink(e)
            except Exception:  # the consumer went away; the engine carries on
                log.exception("event sink failed")

    def _emit_end(self, req: Request, events, cancelled: bool = False) -> None:
        if req.done:
            return
        self._emit(req, events)
        req.done, req.t_end = True, time.perf_counter()
        req.reason = next((e.reason for e in events if e.kind == "end"), None)
        if req.reason is None and req.reply is not None:
            req.reason = req.reply.reason
        if req.reply is not None:
            self.stats.tokens += req.reply.tokens
            self.stats.frames += req.reply.frames
        if cancelled:
            self.stats.cancelled += 1
        with self._lock:
            self._active_requests -= 1

    # ---- prefill ----------------------------------------------------------------------------

    def _prefill_positions(self) -> int:
        """Positions to prefill this iteration: all when nobody is waiting for a decode step,
        else what fits in prefill_budget seconds (16 at least, so prompts always advance)."""
        if not self.n_decode:
            return 1 << 30
        if self._prefill_rate is None:
            return 64
        return max(16, int(self.prefill_budget / self._prefill_rate))

    def _prefill(self) -> None:
        """Run queued prompt positions, every waiting session in one batched backbone call
        (rows at their own positions, as in a decode step): when many users end their turns
        at once, one call over all of them costs a fraction of one call each."""
        budget = self._prefill_positions()
        ran, spent = 0, 0.0  # positions and seconds in the backbone (the encoder not counted)
        while self.prefill_queue and budget > 0:
            self._embed_new()  # turns queued since, also by replies that just finished
            if not self.prefill_queue:
                break
            group = list(self.prefill_queue)
            # Equal-length chunks for every row; at most prefill_chunk positions in all (the
            # activations' memory), and the budget's share.
            n = min(min(s.prefill_emb.shape[0] for s in group), max(1, self.prefill_chunk // len(group)),
                    max(16, budget // len(group)))
            first = self.n_decode
            for j, s in enumerate(group):  # the rows side by side after the decoding block
                self._move(s.row, first + j)
            rows = range(first, first + len(group))
            t0 = time.perf_counter()
            try:
                x = torch.stack([s.prefill_emb[:n] for s in group])
                h = self.model.lfm(x, self.slots.block(rows.start, rows.stop))
                self.slots.advanced(rows, n)
            except Exception as e:
                log.exception("prefill failed")
                self._fail_prefills(group, e)
                continue
            spent += time.perf_counter() - t0
            budget -= n * len(group)
            ran += n * len(group)
            self.stats.prefill_calls += 1
            self.stats.prefill_rows += len(group)
            for j, s in enumerate(group):
                s.prefill_emb = s.prefill_emb[n:]
                if s.prefill_emb.shape[0]:
                    continue  # the budget or the chunk size ran out: the loop decides
                self.prefill_queue.remove(s)
                s.prefill_emb = None
                req = s.active
                req.reply.h = h[j, -1]
                if req.done:  # cancelled while prefilling: close the turn quietly
                    req.reply.finish("cancelled")
                    self._reply_finished(s)
                else:
                    self._enter_decode(s)
        if ran:
            rate = spent / ran
            self._prefill_rate = rate if self._prefill_rate is None else 0.8 * self._prefill_rate + 0.2 * rate
        self.stats.prefill_positions += ran
        self.stats.prefill_seconds += spent

    # ---- decode -----------------------------------------------------------------------------

    def _enter_decode(self, s: Session) -> None:
        self._move(s.row, self.n_decode)
        self.n_decode += 1
        s.state = "decode"

    def _leave_decode(self, s: Session) -> None:
        self.n_decode -= 1
        self._move(s.row, self.n_decode)
        s.state = "idle"

    def _move(self, a: int, b: int) -> None:
        """Swap rows a and b (cache contents and owners)."""
        if a == b:
            return
        self.slots.swap(a, b)
        sa, sb = self.rows[a], self.rows[b]
        self.rows[a], self.rows[b] = sb, sa
        if sa is not None:
            sa.row = b
        if sb is not None:
            sb.row = a

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        n = self.n_decode
        try:
            self._sample_step(self.rows[:n])
            # Replies that ended on this sample leave the block before the backbone step.
            for s in [s for s in self.rows[:n] if s.active.reply.finished]:
                self._leave_decode(s)
                self._end_reply(s, [])
            if self.n_decode:
                self._backbone_step(self.rows[: self.n_decode])
            for s in list(self.rows[: self.n_decode]):
                events = s.active.reply.after_step(s.active.reply.h)
                if events:
                    self._leave_decode(s)
                    self._end_reply(s, events)
        except Exception as e:
            log.exception("decode step failed")
            for s in list(self.rows[: self.n_decode]):
                req = s.active
                self._leave_decode(s)
                self._fail_internal(s, req, e)
                self._reply_finished(s)
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.step_rows += n
        self.stats.step_seconds += dt
        for observe in self.step_observers:
            observe(dt, n)

    def _end_reply(self, s: Session, events) -> None:
        self._emit_end(s.active, events)
        self._reply_finished(s)

    def _sample_step(self, block: list[Session]) -> None:
        """Sample every row's next item with its head, emit the events and record the feeds.
        A reply that ends here is marked finished (its end event is already sent). A row whose
        bookkeeping fails ends with an error without disturbing the others."""
        H = torch.stack([s.active.reply.h for s in block])
        text_rows, audio_rows = [], []
        for i, s in enumerate(block):
            (audio_rows if s.active.reply.wants_audio else text_rows).append(i)
        picked: dict[int, object] = {}
        if text_rows:
            toks = {i: block[i].active.reply.forced_token() for i in text_rows}
            need = [i for i in text_rows if toks[i] is None]
            if need:
                logits = self.model.text_logits(H[need])
                toks.update(zip(need, self._sample_groups(logits, [block[i].active.reply for i in need], frames=False)))
            picked.update((i, int(toks[i])) for i in text_rows)
        if audio_rows:
            frames = self._sample_groups(H[audio_rows], [block[i].active.reply for i in audio_rows], frames=True)
            picked.update(zip(audio_rows, frames))
        for i, s in enumerate(block):
            reply = s.active.reply
            try:
                events = reply.take_frame(picked[i]) if i in audio_rows else reply.take_token(picked[i])
                if not reply.finished:
                    events = events + reply.feed_input()
            except Exception as e:
                log.exception("reply bookkeeping failed")
                reply.finished, reply.next_input, reply.reason = True, None, "error"
                s.broken = f"conversation unusable after an internal error: {e}"
                events = [Event("error", reason=f"internal error: {e}", text="internal_error"), Event("end", reason="error")]
                self.stats.failed += 1
            self._emit(s.active, events)

    def _sample_groups(self, x: torch.Tensor, replies: list[ReplyMachine], frames: bool) -> list:
        """Sample one item per row. Rows sharing sampling settings (and no private generator)
        are sampled together; greedy rows always are (they draw no randomness)."""
        out: list = [None] * len(replies)
        groups: dict[Sampling, list[int]] = {}
        for i, r in enumerate(replies):
            p = r.sampling
            if r.generator is not None and not p.greedy:
                out[i] = self._sample_one(x[i : i + 1], p, r.generator, frames)[0]
            else:
                groups.setdefault(Sampling() if p.greedy else p, []).append(i)
        for p, rows in groups.items():
            picked = self._sample_one(x[rows], p, None, frames)
            for j, i in enumerate(rows):
                out[i] = picked[j]
        return out

    def _sample_one(self, x: torch.Tensor, p: Sampling, generator, frames: bool):
        if frames:
            return self.model.sample_frame(x, p, generator)
        if generator is not None:
            # generate() samples a single row from 1-D logits; do the same so the draws match.
            return sample(x[0], p, generator).reshape(1)
        return sample(x, p, generator)

    def _backbone_step(self, block: list[Session]) -> None:
        text_idx, text_tok, audio_idx, audio_frames = [], [], [], []
        for i, s in enumerate(block):
            modality, value = s.active.reply.next_input
            if modality == MODALITY_AUDIO_OUT:
                audio_idx.append(i)
                audio_frames.append(value)
            else:
                text_idx.append(i)
                text_tok.append(value)
        model = self.model
        x = torch.empty(len(block), model.cfg.lfm.hidden_size, dtype=model.dtype, device=model.device)
        if text_idx:
            x[text_idx] = model.lfm.embed_tokens(torch.tensor(text_tok, device=model.device))
        if audio_idx:
            x[audio_idx] = model.embed_audio_frames(torch.stack(audio_frames).to(model.device))
        n = len(block)
        out = model.lfm(x[:, None], self.slots.block(0, n))[:, 0]
        self.slots.advanced(range(n))
        for i, s in enumerate(block):
            s.active.reply.h = out[i]

    # ---- shutdown ---------------------------------------------------------------------------

    def _shutdown(self) -> None:
        for s in list(self.rows):
            if s is None:
                continue
            for req in ([s.active] if s.active is not None else []) + list(s.waiting):
                self._emit_end(req, [Event("end", reason="shutdown")], cancelled=True)
        # Commands that arrived after the stop.
        while True:
            try:
                kind, item = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                with self._lock:
                    self._active_requests += 1
                self._emit_end(item, [Event("end", reason="shutdown")])

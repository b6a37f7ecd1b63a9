"""The engine in a process of its own, behind the Engine API the runtime uses.

Why: every torch op releases the interpreter lock and takes it back, and a decode step is
hundreds of small ops. While another thread of the same process runs Python (the event loop
sending audio, reading microphone messages), each of those take-backs waits, so the engine
crawls whenever the server is busy. Measured on 2 cores (demo model, 16 sessions submitted
together, one decode thread): a decode step of 17.4 ms took 22.8-23.3 ms with a second thread
running Python a quarter of the time, whatever the switch interval (0.1-5 ms); the engine
thread of the server spent 3.9 ms of CPU per audio frame against 2.1 ms run alone. In a child
process the engine's ops wait for nobody.

`EngineProcess` mirrors `Engine` (open_session -> session.submit(turns, params, sink) ->
request.cancel(), session.close(), stats, step_observers, admission counts). The child runs
an `Engine`; commands go to it over a pipe, and its events come back in batches (one message
per batch of events, not one per event) to a reader thread here that calls the sinks, as the
engine thread would. Tensors cross as numpy arrays. Admission is counted on this side, so
`open_session` answers at once (the child's count trails it, never leads). A child that dies
ends every reply in flight with an error; later sessions are refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from typing import Callable

import torch

from ..generation.generate import Event
from .audio import main_hidden
from .engine import Engine, EngineClosed, EngineStats, Features, engine_limits
from .reply import ReplyParams

log = logging.getLogger("lfm2_audio.serving")

START_TIMEOUT = 300.0  # seconds for the child to import, receive the model and allocate its cache
STATS_INTERVAL = 0.5  # seconds: an idle child still sends the stats its last iteration left


class RemoteRequest:
    """One reply in flight in the child. `sink(event)` is called on the reader thread."""

    def __init__(self, session: "RemoteSession", rid: int, sink: Callable[[Event], None]):
        self.session, self.id, self.sink = session, rid, sink
        self.done = False
        self.reason: str | None = None
        self.prompt_positions = 0  # known at the end, as the engine's Request has them
        self.reply: ReplyUsage | None = None

    def cancel(self) -> None:
        """Stop the reply; its "end" event (reason "cancelled") follows within one step."""
        self.session.engine._send(("cancel", self.id))


@dataclasses.dataclass
class ReplyUsage:
    """What the front ends read of a finished reply's ReplyMachine."""

    tokens: int
    frames: int


class RemoteSession:
    """A conversation holding one cache row of the child's engine until closed."""

    _ids = itertools.count(1)

    def __init__(self, engine: "EngineProcess"):
        self.engine, self.id = engine, next(self._ids)
        self.broken: str | None = None  # as the child's session says, from its last reply
        self.closed = False

    def submit(self, turns, params: ReplyParams, sink: Callable[[Event], None]) -> RemoteRequest:
        """Queue turns ([(role, [str | Features | audio ...])]) and a reply to them."""
        if self.closed:
            raise EngineClosed("session is closed")
        return self.engine._submit(self, list(turns), params, sink)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine._send(("close", self.id))


class EngineProcess:
    # Engine's code where it reads only what both keep (log-mel runs on the caller's side;
    # admission is counted on this side).
    features, features_16k = Engine.features, Engine.features_16k
    __enter__, __exit__, open_sessions = Engine.__enter__, Engine.__exit__, Engine.open_sessions
    _admit, _release_admission = Engine._admit, Engine._release_admission

    def __init__(self, model, tokenizer, max_sessions: int = 16, max_context: int = 4096,
                 prefill_chunk: int = 2048, prefill_budget: float = 0.1,
                 on_slot_freed: Callable[[], None] | None = None, threads: int | None = None, fast: bool = False):
        """model: plain or a FastLFM2Audio (the child builds its fast path again from the plain
        model, with the same options); fast: build one in the child for a plain model."""
        self.model, self.tokenizer = model, tokenizer
        self.max_sessions, self.max_context = engine_limits(model, max_sessions, max_context)
        self.on_slot_freed = on_slot_freed
        self.threads = threads or torch.get_num_threads()
        self.fast = fast
        self.engine_args = dict(max_sessions=self.max_sessions, max_context=self.max_context,
                                prefill_chunk=int(prefill_chunk), prefill_budget=float(prefill_budget))
        self.stats = EngineStats()
        self.step_observers: list[Callable[[float, int], None]] = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._open = 0
        self._requests: dict[int, RemoteRequest] = {}
        self._rids = itertools.count(1)
        self._stopped = False
        self.failure: str | None = None  # why the child is gone, once it died (restart the server)
        self._process = self._conn = self._reader = None

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> "EngineProcess":
        if self._process is not None:
            return self
        ctx = multiprocessing.get_context("spawn")  # this process already runs torch's threads
        ours, theirs = ctx.Pipe()
        model, fast = _portable_model(self.model)
        if fast is None and self.fast:
            fast = {}
        self._process = ctx.Process(target=_child_main, name="lfm2-engine",
                                    args=(theirs, model, self.tokenizer, fast, self.engine_args, self.threads),
                                    daemon=True)
        with main_hidden():
            self._process.start()
        theirs.close()
        self._conn = ours
        if not ours.poll(START_TIMEOUT):
            self._process.kill()
            raise RuntimeError("the engine process did not start")
        status = ours.recv()
        if status[0] != "ready":
            self._process.join(5)
            raise RuntimeError(f"the engine process failed to start: {status[1]}")
        self._reader = threading.Thread(target=self._read, name="lfm2-engine-reader", daemon=True)
        self._reader.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what runs (reason "shutdown") and end the child."""
        with self._lock:
            self._stopped = True
        if self._process is None:
            return
        self._send(("stop",))
        if self._reader is not None:
            self._reader.join(timeout)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()

    @property
    def active_requests(self) -> int:
        return len(self._requests)

    # ---- the API ------------------------------------------------------------------------------

    def open_session(self, system: str | None = None, max_context: int | None = None) -> RemoteSession:
        conv = self._admit(system, max_context)  # its errors here and now; the child makes its own
        session = RemoteSession(self)
        self._send(("open", session.id, system, conv.max_context))
        return session

    def _submit(self, session: RemoteSession, turns, params: ReplyParams, sink) -> RemoteRequest:
        req = RemoteRequest(session, next(self._rids), sink)
        self._requests[req.id] = req
        if self.failure:
            self._end_with_error(req, self.failure)
        else:
            self._send(("submit", req.id, session.id, _portable_turns(turns), params))
        return req

    def _send(self, message) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the child is gone: the reader reports it
                pass

    # ---- the reader thread ------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "stopped":
                break
            try:
                self._deliver(message)
            except Exception:  # a sink or an observer failed: the engine carries on
                log.exception("engine event delivery failed")
        if not self._stopped:
            self._died("the engine process died")

    def _deliver(self, message) -> None:
        _, items, stats, steps = message
        for field, value in stats.items():
            setattr(self.stats, field, value)
        for dt, n in steps:
            for observe in self.step_observers:
                observe(dt, n)
        for item in items:
            if item[0] == "freed":
                self._release_admission()
                continue
            rid, (kind, token, text, frame, reason), end = item
            req = self._requests.get(rid)
            if req is None:
                continue
            event = Event(kind, token=token, text=text, reason=reason,
                          frame=None if frame is None else torch.from_numpy(frame))
            if kind == "end":
                req.done, req.reason = True, reason
                req.session.broken, req.prompt_positions, usage = end
                req.reply = None if usage is None else ReplyUsage(*usage)
                del self._requests[rid]
            try:
                req.sink(event)
            except Exception:  # the consumer went away
                log.exception("event sink failed")

    def _died(self, why: str) -> None:
        log.error("%s; replies in flight end with an error, new sessions are refused", why)
        self.failure = why
        for req in list(self._requests.values()):
            self._end_with_error(req, why)

    def _end_with_error(self, req: RemoteRequest, why: str) -> None:
        self._requests.pop(req.id, None)
        req.done, req.reason = True, "error"
        for event in (Event("error", reason=f"internal error: {why}", text="internal_error"), Event("end", reason="error")):
            try:
                req.sink(event)
            except Exception:
                log.exception("event sink failed")


# ---- what crosses the pipe ---------------------------------------------------------------


def _portable_model(model):
    """(plain model, FastLFM2Audio options or None): the fast wrapper's prepacked weights do
    not pickle; the child wraps the plain model again."""
    from ..generation.fast import FastLFM2Audio

    if isinstance(model, FastLFM2Audio):
        return model.model, dict(prepack=model.prepack, exact=model.depth.exact)
    return model, None


def _portable_turns(turns):
    """Features and tensors as numpy (torch would send tensors as shared-memory handles)."""
    def item(c):
        if isinstance(c, Features):
            return ("features", c.value.numpy())
        if isinstance(c, torch.Tensor):
            return c.numpy()
        return c
    return [(role, [item(c) for c in contents]) for role, contents in turns]


def _local_turns(turns):
    def item(c):
        if isinstance(c, tuple) and len(c) == 2 and c[0] == "features":
            return Features(torch.from_numpy(c[1]))
        return c
    return [(role, [item(c) for c in contents]) for role, contents in turns]


# ---- the child ------------------------------------------------------------------------------


def _child_main(conn, model, tokenizer, fast, engine_args: dict, threads: int) -> None:
    # Ctrl-C reaches the whole process group: the server decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    steps: list = []
    try:
        if fast is not None:
            from ..generation.fast import FastLFM2Audio

            model = FastLFM2Audio(model, threads=0, **fast)
        engine = Engine(model, tokenizer, on_slot_freed=lambda: outbox.put(("freed",)), **engine_args)
        engine.step_observers.append(lambda dt, n: steps.append((dt, n)))
        engine.start()
    except BaseException as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))  # from here on only the sender thread sends, then "stopped" below

    def sender() -> None:
        # One message per batch of whatever events are waiting: a decode step's 16 frames
        # cost one pickling and one wake-up of the parent's reader, not 16.
        sent_stats = None
        while True:
            try:
                items = [outbox.get(timeout=STATS_INTERVAL)]
            except queue.Empty:
                items = []  # idle: only the stats, if the engine's last iteration changed them
            while True:
                try:
                    items.append(outbox.get_nowait())
                except queue.Empty:
                    break
            last = bool(items) and items[-1] is None
            items = [i for i in items if i is not None]
            batch, taken = steps[:], len(steps)
            del steps[:taken]
            stats = dataclasses.asdict(engine.stats)
            if items or batch or stats != sent_stats:
                conn.send(("events", items, stats, batch))
                sent_stats = stats
            if last:
                return

    sending = threading.Thread(target=sender, name="lfm2-engine-sender", daemon=True)
    sending.start()
    sessions, requests = {}, {}
    requests_lock = threading.Lock()  # a reply may end before submit() returns here

    def sink_for(rid: int, session):
        def sink(e: Event) -> None:  # engine thread
            frame = None if e.frame is None else e.frame.cpu().numpy()
            end = None
            if e.kind == "end":  # what the parent's request needs once it is done
                with requests_lock:
                    req = requests.pop(rid, None)
                reply = req.reply if req is not None else None
                end = (session.broken, req.prompt_positions if req is not None else 0,
                       None if reply is None else (reply.tokens, reply.frames))
            outbox.put((rid, (e.kind, e.token, e.text, frame, e.reason), end))
        return sink

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        kind = message[0]
        try:
            if kind == "stop":
                break
            if kind == "open":
                _, sid, system, limit = message
                try:
                    sessions[sid] = engine.open_session(system=system, max_context=limit)
                except Exception:
                    outbox.put(("freed",))  # the parent counted it: give the count back
                    raise
            elif kind == "submit":
                _, rid, sid, turns, params = message
                session = sessions[sid]
                with requests_lock:
                    requests[rid] = session.submit(_local_turns(turns), params, sink_for(rid, session))
            elif kind == "cancel":
                req = requests.get(message[1])
                if req is not None:
                    req.cancel()
            elif kind == "close":
                session = sessions.pop(message[1], None)
                if session is not None:
                    session.close()
        except Exception as e:
            log.exception("engine process: command %s failed", kind)
            if kind == "submit":
                outbox.put((message[1], ("error", None, "internal_error", None, f"internal error: {e}"), None))
                outbox.put((message[1], ("end", None, "", None, "error"), (None, 0, None)))
    engine.stop()
    outbox.put(None)
    sending.join()  # every event out before "stopped"
    try:
        conn.send(("stopped",))
    except (OSError, ValueError):
        pass

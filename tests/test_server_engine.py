"""The serving engine against generate(): same events alone, same events when batched with
others, cancellation, admission control and bad input. Tiny random model, CPU."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch

from lfm2_audio.generation.chat import SYSTEM_PROMPTS, Conversation
from lfm2_audio.generation.generate import generate
from lfm2_audio.generation.sampling import Sampling
from lfm2_audio.serving.engine import Engine, EngineFull, Features
from lfm2_audio.serving.reply import ReplyParams


def tone(seconds=1.0, rate=16000, freq=220.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Decode steps of a tiny model are a few microseconds of math each: one thread is fastest,
    # and on a busy machine several threads spin and stall each other for tens of ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def engine(tiny_model, tokenizer):
    e = Engine(tiny_model, tokenizer, max_sessions=6, max_context=1024).start()
    yield e
    e.stop()


class Collector:
    """A sink that gathers events and lets the test wait for the end."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.kind == "end":
            self.done.set()

    def wait(self, timeout=60.0):
        assert self.done.wait(timeout), "no end event"
        return self.events


def summary(events):
    """Comparable form: (kind, token or frame codes, text, reason)."""
    out = []
    for e in events:
        if e.kind == "text":
            out.append(("text", e.token, e.text))
        elif e.kind == "audio":
            out.append(("audio", tuple(e.frame.tolist())))
        else:
            out.append((e.kind, e.reason))
    return out


def features(model, seconds, freq):
    from lfm2_audio.audio.features import log_mel

    feats, _ = log_mel(torch.from_numpy(tone(seconds, freq=freq)), model.cfg.preprocessor)
    return feats


def reference(model, tok, turns, params: ReplyParams):
    """generate() on a plain Conversation: the events of each reply, in order."""
    conv = Conversation(model, tok, system=SYSTEM_PROMPTS["chat"], max_context=1024)
    replies = []
    for feats in turns:
        conv.new_turn("user")
        conv.add_features(feats)
        conv.end_turn()
        replies.append(list(generate(conv, params.mode, params.text_sampling, params.audio_sampling,
                                     params.max_new_tokens, params.seed, params.force_tokens)))
    return conv, replies


def run_engine(engine, turns, params):
    s = engine.open_session(system=SYSTEM_PROMPTS["chat"], max_context=1024)
    replies = []
    for feats in turns:
        c = Collector()
        s.submit([("user", [Features(feats)])], params, c)
        replies.append(c.wait())
    return s, replies


@pytest.mark.parametrize("mode", ["interleaved", "sequential"])
def test_alone_equals_generate(engine, tiny_model, tokenizer, mode):
    turns = [features(tiny_model, 0.8, 220), features(tiny_model, 0.5, 330)]
    params = ReplyParams(mode=mode, max_new_tokens=30, force_tokens=(tokenizer.audio_start_id,) if mode == "sequential" else ())
    conv, want = reference(tiny_model, tokenizer, turns, params)
    session, got = run_engine(engine, turns, params)
    for w, g in zip(want, got):
        assert summary(g) == summary(w)
    assert any(e.kind == "audio" for e in got[0])
    time.sleep(0.05)
    assert session.conv.record.text == conv.record.text
    assert session.conv.record.modality == conv.record.modality
    session.close()


def test_seeded_sampling_alone_equals_generate(engine, tiny_model, tokenizer):
    turns = [features(tiny_model, 0.6, 250)]
    params = ReplyParams(text_sampling=Sampling(0.9, top_k=20), audio_sampling=Sampling(1.0, top_k=4),
                         max_new_tokens=30, seed=123)
    _, want = reference(tiny_model, tokenizer, turns, params)
    session, got = run_engine(engine, turns, params)
    assert summary(got[0]) == summary(want[0])
    session.close()


def test_concurrent_sessions_equal_alone(engine, tiny_model, tokenizer):
    """Four sessions started together are batched; each says what it says alone."""
    params = ReplyParams(max_new_tokens=40)
    clips = [features(tiny_model, 0.4 + 0.15 * i, 200 + 60 * i) for i in range(4)]
    want = [summary(reference(tiny_model, tokenizer, [c], params)[1][0]) for c in clips]
    steps_before = engine.stats.steps
    rows_before = engine.stats.step_rows
    sessions = [engine.open_session(system=SYSTEM_PROMPTS["chat"], max_context=1024) for _ in clips]
    collectors = [Collector() for _ in clips]
    for s, c, clip in zip(sessions, collectors, clips):
        s.submit([("user", [Features(clip)])], params, c)
    got = [summary(c.wait()) for c in collectors]
    assert got == want
    steps = engine.stats.steps - steps_before
    rows = engine.stats.step_rows - rows_before
    assert rows / steps > 2.0, "the sessions were not batched"
    for s in sessions:
        s.close()


def test_turns_that_arrive_together_are_prefilled_together(tiny_model, tokenizer):
    """Prompts waiting at the same time go through the backbone in one batched call, rows at
    their own positions (second turns after histories of different lengths); each session
    still says what it says alone."""
    params = ReplyParams(max_new_tokens=12)
    turns = [[features(tiny_model, 0.3 + 0.2 * i, 250 + 40 * i), features(tiny_model, 0.5 - 0.1 * i, 400 + 30 * i)]
             for i in range(3)]
    want = [[summary(r) for r in reference(tiny_model, tokenizer, t, params)[1]] for t in turns]
    e = Engine(tiny_model, tokenizer, max_sessions=4, max_context=1024)
    sessions = [e.open_session(system=SYSTEM_PROMPTS["chat"], max_context=1024) for _ in turns]
    first = [Collector() for _ in turns]
    for s, c, t in zip(sessions, first, turns):
        s.submit([("user", [Features(t[0])])], params, c)
    with e:  # started now: all three first turns are waiting
        got_first = [summary(c.wait()) for c in first]
        assert e.stats.prefill_rows > e.stats.prefill_calls, "the first turns were prefilled one by one"
        # Hold the engine thread inside a sink while the second turns are submitted, so that
        # they all arrive at one iteration.
        gate, held = threading.Event(), threading.Event()

        def hold_engine(event):
            if not held.is_set():
                held.set()
                gate.wait(10)

        e.open_session(system="x").submit([("user", ["wait"])], ReplyParams(max_new_tokens=3), hold_engine)
        assert held.wait(10)
        calls, rows = e.stats.prefill_calls, e.stats.prefill_rows
        second = [Collector() for _ in turns]
        for s, c, t in zip(sessions, second, turns):
            s.submit([("user", [Features(t[1])])], params, c)
        gate.set()
        got_second = [summary(c.wait()) for c in second]
        assert e.stats.prefill_rows - rows >= 3 and e.stats.prefill_rows - rows > e.stats.prefill_calls - calls
    assert [[a, b] for a, b in zip(got_first, got_second)] == want


def test_cancel_stops_within_a_step_and_session_continues(engine, tiny_model, tokenizer):
    s = engine.open_session(system=SYSTEM_PROMPTS["chat"], max_context=1024)
    c = Collector()
    got_audio = threading.Event()

    def sink(e):
        c(e)
        if e.kind == "audio":
            got_audio.set()

    req = s.submit([("user", [Features(features(tiny_model, 0.5, 300))])], ReplyParams(max_new_tokens=5000), sink)
    assert got_audio.wait(30)
    t0 = time.perf_counter()
    req.cancel()
    events = c.wait(5)
    assert time.perf_counter() - t0 < 0.1
    assert events[-1].reason == "cancelled"
    n = len(events)
    time.sleep(0.1)
    assert len(c.events) == n  # nothing after the end
    # The conversation goes on.
    c2 = Collector()
    s.submit([("user", ["and then?"])], ReplyParams(max_new_tokens=8), c2)
    assert c2.wait()[-1].reason == "max_new_tokens"
    s.close()


def test_admission_and_close_frees_the_row(tiny_model, tokenizer):
    freed = threading.Event()
    with Engine(tiny_model, tokenizer, max_sessions=2, max_context=256, on_slot_freed=freed.set) as e:
        a = e.open_session(system="x")
        b = e.open_session(system="y")
        with pytest.raises(EngineFull):
            e.open_session()
        c = Collector()
        a.submit([("user", ["hello"])], ReplyParams(max_new_tokens=10_000), c)
        time.sleep(0.2)
        a.close()  # mid-reply: freed at once
        assert c.wait(2)[-1].reason == "cancelled"
        assert freed.wait(2)
        d = e.open_session(system="z")
        c2 = Collector()
        d.submit([("user", ["hi"])], ReplyParams(max_new_tokens=5), c2)
        assert c2.wait()[-1].reason == "max_new_tokens"
        b.close()
        d.close()


def test_context_limit_and_bad_input_are_errors_for_that_session_only(engine, tiny_model, tokenizer):
    small = engine.open_session(system=SYSTEM_PROMPTS["chat"], max_context=40)
    other = engine.open_session(system=SYSTEM_PROMPTS["chat"], max_context=1024)
    c_small, c_other = Collector(), Collector()
    other.submit([("user", ["hello"])], ReplyParams(max_new_tokens=60), c_other)
    small.submit([("user", ["word " * 100])], ReplyParams(max_new_tokens=10), c_small)
    ev = c_small.wait()
    assert ev[0].kind == "error" and "context" in ev[0].reason
    assert ev[-1].reason == "error"
    # A reply that reaches the limit ends with reason context_limit.
    tight = engine.open_session(system=None, max_context=24)
    c_tight = Collector()
    tight.submit([("user", ["hi"])], ReplyParams(max_new_tokens=100), c_tight)
    assert c_tight.wait()[-1].reason == "context_limit"
    assert c_other.wait()[-1].reason == "max_new_tokens"
    assert sum(e.kind == "text" or e.kind == "audio" for e in c_other.events) == 60
    for s in (small, other, tight):
        s.close()


def test_engine_process_replies_as_the_engine_does(tiny_model, tokenizer):
    """The engine in a child process: the same events as generate(), batched replies, usage,
    cancellation, admission given back on close, stats and step times."""
    from lfm2_audio.serving.engine_process import EngineProcess

    freed = []
    turns = [features(tiny_model, 0.8, 220), features(tiny_model, 0.5, 330)]
    params = ReplyParams(max_new_tokens=30)
    _, want = reference(tiny_model, tokenizer, turns, params)
    steps = []
    with EngineProcess(tiny_model, tokenizer, max_sessions=2, max_context=1024, threads=1,
                       on_slot_freed=lambda: freed.append(1)) as engine:
        engine.step_observers.append(lambda dt, n: steps.append(n))
        session, got = run_engine(engine, turns, params)
        for w, g in zip(want, got):
            assert summary(g) == summary(w)
        # two sessions at once decode in one batch, each as it would alone
        other = engine.open_session(system=SYSTEM_PROMPTS["chat"], max_context=1024)
        with pytest.raises(EngineFull):
            engine.open_session()
        a, b = Collector(), Collector()
        ra = session.submit([("user", [Features(turns[0])])], params, a)
        other.submit([("user", [Features(turns[0])])], params, b)
        assert summary(b.wait()) == summary(want[0])
        a.wait()
        assert max(steps) == 2 and engine.stats.frames > 0 and engine.stats.requests == 4
        assert ra.done and ra.reply.tokens + ra.reply.frames == 30 and ra.prompt_positions > 0
        # cancelled mid-reply: the end says so, and the session takes the next turn
        c = Collector()
        req = other.submit([("user", [Features(turns[1])])], ReplyParams(max_new_tokens=1000), c)
        while not c.events:
            time.sleep(0.01)
        req.cancel()
        assert c.wait()[-1].reason == "cancelled" and engine.active_requests == 0
        deadline = time.monotonic() + 5  # gauges follow the child's last iteration when it idles
        while engine.stats.decoding and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats.decoding == 0 and engine.stats.prefilling == 0
        session.close()
        other.close()
        deadline = time.monotonic() + 10
        while engine.open_sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.open_sessions == 0 and len(freed) == 2


def test_engine_process_that_dies_fails_its_replies_and_refuses_new_ones(tiny_model, tokenizer):
    import os
    import signal

    from lfm2_audio.serving.engine import EngineClosed
    from lfm2_audio.serving.engine_process import EngineProcess

    with EngineProcess(tiny_model, tokenizer, max_sessions=2, max_context=1024, threads=1) as engine:
        s = engine.open_session(system=SYSTEM_PROMPTS["chat"])
        c = Collector()
        s.submit([("user", [Features(features(tiny_model, 0.5, 220))])], ReplyParams(max_new_tokens=1000), c)
        while not c.events:
            time.sleep(0.01)
        os.kill(engine._process.pid, signal.SIGKILL)
        events = c.wait()
        assert events[-2].kind == "error" and events[-2].text == "internal_error" and events[-1].reason == "error"
        with pytest.raises(EngineClosed, match="died"):
            engine.open_session()
        assert "died" in engine.failure  # what /health reports


def test_codec_process_decodes_as_the_thread_does_and_survives_its_child():
    import asyncio
    import os
    import signal

    from lfm2_audio.serving.audio import BrokenProcessPool, CodecWorker
    from lfm2_audio.serving.testing import tiny_codec

    codec = tiny_codec()
    frames = [torch.randint(0, 2048, (8,)) for _ in range(7)]

    async def stream(worker):
        dec = worker.decoder()
        parts = [await dec.decode(frames[:3]), await dec.decode(frames[3:])]
        return np.concatenate(parts + [await dec.flush()])

    thread, child = CodecWorker(codec, process=False), CodecWorker(codec, process=True)
    try:
        assert not thread.process and child.process
        expected = asyncio.run(stream(thread))
        assert expected.size > 0
        np.testing.assert_array_equal(asyncio.run(stream(child)), expected)

        async def after_a_kill():
            pid = next(iter(child.pool._processes))
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(BrokenProcessPool):  # the reply in flight fails ...
                for _ in range(50):
                    await child.decoder().decode(frames[:1])
                    await asyncio.sleep(0.05)
            return await stream(child)  # ... and the next one gets a fresh child

        np.testing.assert_array_equal(asyncio.run(after_a_kill()), expected)
    finally:
        thread.close()
        child.close()


def test_codec_worker_sends_waiting_replies_in_one_call():
    import asyncio

    from lfm2_audio.serving.audio import CodecWorker
    from lfm2_audio.serving.testing import tiny_codec

    frames = [[torch.randint(0, 2048, (8,)) for _ in range(3)] for _ in range(4)]
    worker = CodecWorker(tiny_codec(), process=False)

    async def alone(f):
        d = worker.decoder()
        return np.concatenate([await d.decode(f), await d.flush()])

    async def together():
        decoders = [worker.decoder() for _ in frames]
        first = await asyncio.gather(*(d.decode(f) for d, f in zip(decoders, frames)))
        calls = worker.calls
        tails = [await d.flush() for d in decoders]
        return calls, [np.concatenate(p) for p in zip(first, tails)]

    try:
        expected = [asyncio.run(alone(f)) for f in frames]
        before = worker.calls
        calls, got = asyncio.run(together())
        assert calls - before == 1 and worker.pushes == 4 + 4  # four replies' pushes, one call
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)
        assert not worker.host.streams  # flushed streams are gone from the worker
    finally:
        worker.close()


def test_codec_process_starts_from_a_script_without_a_main_guard(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import asyncio, torch\n"
        "from lfm2_audio.serving.audio import CodecWorker\n"
        "from lfm2_audio.serving.testing import tiny_codec\n"
        "print('script body runs', flush=True)\n"
        "w = CodecWorker(tiny_codec(), process=True)\n"
        "async def go():\n"
        "    d = w.decoder()\n"
        "    return (await d.decode([torch.zeros(8, dtype=torch.long)] * 3)).size\n"
        "print('process', w.process, asyncio.run(go()), flush=True)\n"
        "w.close()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("script body runs") == 1  # the child did not run the script again
    assert "process True" in out.stdout and out.stderr == ""


def test_runtime_leaves_the_codec_process_a_core(tiny_model, tokenizer):
    """On the CPU the engine and the codec each run in a child process by default; the engine
    gets every core but the codec's."""
    from lfm2_audio.generation.fast import FastLFM2Audio, usable_cores
    from lfm2_audio.pipeline import LFM2Audio
    from lfm2_audio.serving.engine_process import EngineProcess
    from lfm2_audio.serving.runtime import Runtime, ServeConfig
    from lfm2_audio.serving.testing import tiny_codec

    before = torch.get_num_threads()
    try:
        for _ in range(2):  # a second Runtime in the process leaves the same count
            rt = Runtime(LFM2Audio(tiny_model, tokenizer, tiny_codec()), ServeConfig())  # --threads not given
            assert rt.codec.process and rt.codec.threads == 1
            assert torch.get_num_threads() == max(1, usable_cores() - 1)
            assert isinstance(rt.engine, EngineProcess) and rt.engine.threads == torch.get_num_threads()
            rt.shutdown()
        rt = Runtime(LFM2Audio(tiny_model, tokenizer, tiny_codec()), ServeConfig(threads=2, engine_process=False),
                     fast=True)
        assert rt.codec.threads == 2 and torch.get_num_threads() == 2  # given: both use it
        assert isinstance(rt.engine, Engine) and isinstance(rt.lfm.model, FastLFM2Audio)
        rt.shutdown()
        # the fast path is built where the engine runs: in the child, not here as well
        rt = Runtime(LFM2Audio(tiny_model, tokenizer, tiny_codec()), ServeConfig(), fast=True)
        assert rt.engine.fast and rt.lfm.model is tiny_model
        rt.shutdown()
    finally:
        torch.set_num_threads(before)


def test_runtime_decodes_griffin_lim_two_frames_a_call(tiny_model, tokenizer):
    """Griffin-Lim costs the same per frame in any batch of whole windows: the server batches
    2 frames a call (8 for other codecs) and lets a longer backlog run as one window."""
    from lfm2_audio.codec.griffinlim import GriffinLim
    from lfm2_audio.codec.melcodec import MelCodec
    from lfm2_audio.pipeline import LFM2Audio
    from lfm2_audio.serving.runtime import ReplyStream, Runtime, ServeConfig
    from lfm2_audio.serving.testing import tiny_codec

    before = torch.get_num_threads()
    try:
        gl = MelCodec(vocoder=GriffinLim())
        rt = Runtime(LFM2Audio(tiny_model, tokenizer, gl), ServeConfig(codec_process=False, threads=1))
        assert rt.max_batch == 2
        rt.codec.host.decode([(0, np.zeros((1, 8, 1), np.int64))])
        assert rt.codec.host.streams[0].vocoder.backlog == 2  # the replies' streams, ...
        assert gl.vocoder.backlog is None and gl.stream(1).vocoder.backlog is None  # ... not the codec given
        rt.shutdown()
        rt = Runtime(LFM2Audio(tiny_model, tokenizer, tiny_codec()), ServeConfig(codec_process=False, threads=1))
        assert rt.max_batch == ReplyStream.MAX_BATCH == 8
        rt.shutdown()
    finally:
        torch.set_num_threads(before)


def test_encoder_failure_ends_the_batch_and_breaks_only_those_conversations(engine, tiny_model, monkeypatch):
    params = ReplyParams(max_new_tokens=8)
    speech = [("user", [Features(features(tiny_model, 0.6, 220.0))])]
    broken = [engine.open_session(), engine.open_session()]
    sinks = [Collector(), Collector()]

    def fail(clips):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(tiny_model, "encode_audio", fail)
    with engine._lock:  # both turns reach the engine before its next iteration: one encoder batch
        for s, sink in zip(broken, sinks):
            s.submit(speech, params, sink)
    for sink in sinks:
        kinds = summary(sink.wait())
        assert kinds[-1] == ("end", "error")
        err = next(e for e in sink.events if e.kind == "error")
        assert err.text == "internal_error" and "encoder exploded" in err.reason
    monkeypatch.undo()
    again = Collector()
    broken[0].submit([("user", ["hello"])], params, again)
    err = next(e for e in again.wait() if e.kind == "error")
    assert "conversation unusable after an internal error: encoder exploded" in err.reason
    fresh, ok = engine.open_session(), Collector()
    fresh.submit(speech, params, ok)
    assert ok.wait()[-1].kind == "end" and not any(e.kind == "error" for e in ok.events)
    for s in broken + [fresh]:
        s.close()


def _searched_reference(model, tok, feats, decoding, max_new_tokens):
    from lfm2_audio.generation.beam import beam_transcript

    conv = Conversation(model, tok, system=SYSTEM_PROMPTS["asr"], max_context=1024)
    conv.new_turn("user")
    conv.add_features(feats)
    conv.end_turn()
    conv.new_turn("assistant")
    return tok.decode(beam_transcript(conv, decoding, max_new_tokens), skip_special_tokens=True).strip()


@pytest.mark.parametrize("process", [False, True])
def test_searched_transcripts_come_whole_beside_other_replies(tiny_model, tokenizer, process):
    """A beam-searched transcript runs a step at a time between the batched steps of the others:
    its text is beam_transcript's, and the reply beside it is generate()'s."""
    from lfm2_audio.generation.beam import AsrDecoding
    from lfm2_audio.serving.engine_process import EngineProcess

    decoding = AsrDecoding(beam=3, ctc_weight=0.5)
    clip, chat_clip = features(tiny_model, 0.7, 260), features(tiny_model, 0.5, 330)
    want_text = _searched_reference(tiny_model, tokenizer, clip, decoding, 12)
    chat = ReplyParams(max_new_tokens=40)
    want_chat = summary(reference(tiny_model, tokenizer, [chat_clip], chat)[1][0])
    make = (lambda: EngineProcess(tiny_model, tokenizer, max_sessions=3, max_context=1024, threads=1).start()) if process \
        else (lambda: Engine(tiny_model, tokenizer, max_sessions=3, max_context=1024).start())
    engine = make()
    try:
        asr = engine.open_session(system=SYSTEM_PROMPTS["asr"], max_context=1024)
        other = engine.open_session(system=SYSTEM_PROMPTS["chat"], max_context=1024)
        a, b = Collector(), Collector()
        asr.submit([("user", [Features(clip)])], ReplyParams(mode="sequential", max_new_tokens=12,
                                                           asr_decoding=decoding), a)
        other.submit([("user", [Features(chat_clip)])], chat, b)
        got = a.wait()
        assert [e.kind for e in got] == ["text", "end"] and got[0].text == want_text and want_text
        assert got[-1].reason == "end_of_turn"
        assert summary(b.wait()) == want_chat
        # its cache row never saw the turn: the session takes no more
        c = Collector()
        asr.submit([("user", ["again"])], ReplyParams(max_new_tokens=4), c)
        assert c.wait()[-1].reason == "error"
        # cancelled mid-search, the end says so at once
        asr2 = engine.open_session(system=SYSTEM_PROMPTS["asr"], max_context=1024)
        d = Collector()
        req = asr2.submit([("user", [Features(features(tiny_model, 3.0, 200))])],
                          ReplyParams(mode="sequential", max_new_tokens=200, asr_decoding=AsrDecoding(beam=8)), d)
        time.sleep(0.05)
        req.cancel()
        assert d.wait(5)[-1].reason in ("cancelled", "end_of_turn", "max_new_tokens")
        for s in (asr, other, asr2):
            s.close()
    finally:
        engine.stop()


def test_reply_params_take_only_decoding_settings():
    from lfm2_audio.errors import InputError
    from lfm2_audio.generation.beam import AsrDecoding

    assert not ReplyParams().searched and not ReplyParams(asr_decoding=AsrDecoding()).searched
    assert ReplyParams(asr_decoding=AsrDecoding(beam=2)).searched
    with pytest.raises(InputError, match="asr_decoding"):
        ReplyParams(asr_decoding={"beam": 2})

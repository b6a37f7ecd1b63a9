"""Voice activity detection: batched Silero equals one-at-a-time, the energy fallback, the
silence gate, per-session ordering in the worker, and the turn detector's decisions."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from lfm2_audio.serving.vad import CHUNK, RATE, EnergyScorer, TurnDetector, TurnSettings, VadWorker, make_scorer

QUESTION = Path(__file__).parent / "assets" / "question.wav"


def speech16k() -> np.ndarray:
    a, r = sf.read(QUESTION, dtype="float32")
    return soxr.resample(a, r, RATE).astype(np.float32)


def chunks(wave):
    n = wave.size // CHUNK
    return wave[: n * CHUNK].reshape(n, CHUNK)


def test_silero_batched_equals_alone():
    pytest.importorskip("silero_vad")
    threads = torch.get_num_threads()
    scorer = make_scorer("silero")
    assert torch.get_num_threads() == threads  # importing silero_vad must not change our threads
    speech = chunks(speech16k())[:20]
    noise = np.random.default_rng(0).normal(0, 0.01, speech.shape).astype(np.float32)
    alone = []
    for stream in (speech, noise):
        st = scorer.new_state()
        alone.append([scorer.score(c[None], [st])[0] for c in stream])
    states = [scorer.new_state(), scorer.new_state()]
    batched = [scorer.score(np.stack([a, b]), states) for a, b in zip(speech, noise)]
    assert np.allclose(np.array(batched).T, np.array(alone), atol=1e-4)
    assert max(alone[0]) > 0.9 and max(alone[1]) < 0.5  # it hears the speech, not the hiss


def test_energy_scorer():
    sc = EnergyScorer()
    st = sc.new_state()
    quiet = np.random.default_rng(0).normal(0, 0.002, (30, CHUNK)).astype(np.float32)
    loud = chunks(speech16k())[5:15]
    p_quiet = [sc.score(c[None], [st])[0] for c in quiet]
    p_loud = [sc.score(c[None], [st])[0] for c in loud]
    assert max(p_quiet[10:]) < 0.5 and np.mean(p_loud) > 0.5


def test_worker_keeps_each_sessions_order_and_gates_silence():
    worker = VadWorker(make_scorer("energy"))
    got = {0: [], 1: []}
    done = threading.Event()

    def cb(i):
        def on(p, end):
            got[i].append((end, p))
            if all(len(v) == 20 for v in got.values()):
                done.set()
        return on

    streams = [worker.stream(cb(0)), worker.stream(cb(1))]
    wave = np.concatenate([np.zeros(10 * CHUNK, np.float32), speech16k()[: 10 * CHUNK]])
    for i in range(0, wave.size, 700):  # odd-sized pieces, both sessions interleaved
        for s in streams:
            s.feed(wave[i : i + 700])
    assert done.wait(10)
    worker.close()
    for v in got.values():
        assert [e for e, _ in v] == [CHUNK * (k + 1) for k in range(20)]
        assert all(p == 0.0 for _, p in v[:10])  # digital silence is never scored


def test_silence_with_nothing_in_flight_is_scored_on_the_feeding_thread():
    """A quiet microphone costs no wake-up of the worker thread; silence after speech still
    waits for the speech's scores, so each session's order holds."""
    worker = VadWorker(make_scorer("energy"))
    got, threads = [], []
    done = threading.Event()

    def on(p, end):
        got.append(end)
        threads.append(threading.current_thread())
        if len(got) == 14:
            done.set()

    stream = worker.stream(on)
    stream.feed(np.zeros(4 * CHUNK, np.float32))
    assert threads == [threading.current_thread()] * 4  # scored at once, here
    stream.feed(np.concatenate([speech16k()[:6 * CHUNK], np.zeros(4 * CHUNK, np.float32)]))
    assert done.wait(10)
    worker.close()
    assert got == [CHUNK * (k + 1) for k in range(14)]
    assert all(t is worker.thread for t in threads[4:10])


def test_turn_detector():
    d = TurnDetector(TurnSettings(threshold=0.5, silence_duration_ms=200))
    decisions = []
    probs = [0.1] * 3 + [0.9] * 10 + [0.1] * 5 + [0.8] + [0.1] * 10
    for k, p in enumerate(probs):
        decisions.append(d.update(p, (k + 1) * CHUNK))
    starts = [k for k, x in enumerate(decisions) if x == "started"]
    stops = [k for k, x in enumerate(decisions) if x == "stopped"]
    assert starts == [3]  # at once: barge-in needs no confirmation delay
    # 200 ms = 6.25 chunks of silence after the last speech chunk (k=18) -> stop at k=25
    assert stops == [25] and d.start == 3 * CHUNK
    with pytest.raises(Exception):
        TurnSettings.from_dict({"threshold": 2})

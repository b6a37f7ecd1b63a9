"""The realtime WebSocket: a spoken turn ended by server VAD, manual turns, barge-in within
100 ms, bad input, oversized messages, clients that vanish or stop reading. A real WebSocket
client against a server on 127.0.0.1; tiny random model and codec."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_server
import soundfile as sf
import soxr

pytest.importorskip("fastapi")
websockets = pytest.importorskip("websockets")

from lfm2_audio.serving.runtime import ServeConfig  # noqa: E402

QUESTION = Path(__file__).parent / "assets" / "question.wav"
RATE = 24000
CHUNK = 480  # 20 ms at 24 kHz


@pytest.fixture(scope="module")
def server(tiny_model, tokenizer):
    cfg = ServeConfig(max_sessions=6, max_context=2048, queue_timeout=0.5, max_new_tokens=60, max_transcript_tokens=20,
                      max_message_bytes=256 * 1024, send_timeout=2.0, max_backlog_bytes=256 * 1024, vad="auto",
                      threads=1)
    with tiny_server(tiny_model, tokenizer, cfg, sndbuf=64 * 1024) as s:
        yield s


def speech_pcm(lead: float = 0.0, tail: float = 0.0) -> bytes:
    a, r = sf.read(QUESTION, dtype="float32")
    a = soxr.resample(a, r, RATE).astype(np.float32)
    a = np.concatenate([np.zeros(int(lead * RATE), np.float32), a, np.zeros(int(tail * RATE), np.float32)])
    return (np.clip(a, -1, 1) * 32767).astype("<i2").tobytes()


class Client:
    def __init__(self, url: str, **kw):
        self.url, self.kw = url + "/v1/realtime", kw
        self.seen: list[dict] = []

    async def __aenter__(self):
        self.ws = await websockets.connect(self.url, max_size=None, **self.kw)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def send(self, type: str, **fields):
        await self.ws.send(json.dumps({"type": type, **fields}))

    async def recv(self, timeout: float = 20.0) -> dict:
        ev = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        ev["_t"] = time.perf_counter()
        self.seen.append(ev)
        return ev

    async def until(self, type: str, timeout: float = 30.0) -> dict:
        deadline = time.perf_counter() + timeout
        while True:
            ev = await self.recv(max(0.01, deadline - time.perf_counter()))
            if ev["type"] == type:
                return ev

    async def stream_audio(self, pcm: bytes, realtime: float = 1.0, sent_at: list | None = None):
        step = CHUNK * 2
        for i in range(0, len(pcm), step):
            await self.send("input_audio_buffer.append", audio=base64.b64encode(pcm[i:i + step]).decode())
            if sent_at is not None:
                sent_at.append(time.perf_counter())
            await asyncio.sleep(0.02 / realtime)

    def types(self) -> list[str]:
        return [e["type"] for e in self.seen]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_spoken_turn_with_server_vad(server):
    async def main():
        async with Client(server.ws_url) as c:
            created = await c.recv()
            assert created["type"] == "session.created"
            assert created["session"]["turn_detection"]["type"] == "server_vad"
            # the model's default audio sampling (the tiny model's config sets none: the reference's)
            assert (created["session"]["temperature"], created["session"]["top_k"]) == (1.0, 4)
            await c.send("session.update", session={"input_audio_transcription": {"model": "lfm2-audio"},
                                                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}})
            assert (await c.recv())["type"] == "session.updated"
            sender = asyncio.create_task(c.stream_audio(speech_pcm(lead=0.3, tail=1.2), realtime=2.0))
            done = await c.until("response.done")
            await sender
            if "conversation.item.input_audio_transcription.completed" not in c.types():
                await c.until("conversation.item.input_audio_transcription.completed")
            return c, done

    c, done = run(main())
    types = c.types()
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "conversation.item.created", "response.created", "response.audio.delta", "response.audio.done",
             "response.audio_transcript.done", "response.done"]
    positions = [types.index(t) for t in order]
    assert positions == sorted(positions), types
    assert "response.audio_transcript.delta" in types
    started = next(e for e in c.seen if e["type"] == "input_audio_buffer.speech_started")
    assert 150 <= started["audio_start_ms"] <= 600  # the speech starts 0.3 s in
    assert done["response"]["status"] == "incomplete"  # the tiny model talks until max tokens
    usage = done["response"]["usage"]
    assert usage["output_tokens"] == 60
    audio = b"".join(base64.b64decode(e["delta"]) for e in c.seen if e["type"] == "response.audio.delta")
    frames = usage["output_token_details"]["audio_frames"]
    assert len(audio) // 2 == frames * 1920  # every frame arrives, 80 ms each


def test_manual_turns_text_and_audio_items(server):
    async def main():
        async with Client(server.ws_url) as c:
            await c.until("session.created")
            await c.send("session.update", session={"turn_detection": None, "modalities": ["text"],
                                                    "max_response_output_tokens": 8})
            await c.until("session.updated")
            await c.stream_audio(speech_pcm(), realtime=20.0)
            await c.send("input_audio_buffer.commit")
            await c.until("input_audio_buffer.committed")
            await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                           "content": [{"type": "input_text", "text": "Answer briefly."}]})
            await c.until("conversation.item.created")
            await c.send("response.create")
            text_done = await c.until("response.text.done")
            done = await c.until("response.done")
            # A second turn in the same conversation, with audio this time.
            await c.send("response.create", response={"modalities": ["text", "audio"], "max_output_tokens": 20})
            done2 = await c.until("response.done")
            return c, text_done, done, done2

    c, text_done, done, done2 = run(main())
    assert isinstance(text_done["text"], str)
    assert done["response"]["modalities"] == ["text"]
    assert not any(e["type"] == "response.audio.delta" and e["response_id"] == done["response"]["id"] for e in c.seen)
    assert any(e["type"] == "response.audio.delta" and e["response_id"] == done2["response"]["id"] for e in c.seen)
    assert done2["response"]["usage"]["input_tokens"] < done["response"]["usage"]["input_tokens"]  # cache reused


def test_barge_in_cancels_within_100_ms(server):
    async def main():
        async with Client(server.ws_url) as c:
            await c.until("session.created")
            await c.send("session.update", session={"max_response_output_tokens": 4000})
            await c.until("session.updated")
            await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                           "content": [{"type": "input_text", "text": "Tell me a long story."}]})
            await c.send("response.create")
            n = 0
            while n < 5:
                n += (await c.recv())["type"] == "response.audio.delta"
            sent_at: list[float] = []
            sender = asyncio.create_task(c.stream_audio(speech_pcm(), sent_at=sent_at))
            started = await c.until("input_audio_buffer.speech_started")
            done = await c.until("response.done")
            after = []
            try:
                while True:
                    after.append(await c.recv(0.3))
            except asyncio.TimeoutError:
                pass
            sender.cancel()
            return started, done, sent_at, after

    started, done, sent_at, after = run(main())
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    # The chunk that completed the VAD window in which speech was first heard:
    first_speech_16k = started["audio_start_ms"] * 16 + 512
    chunk = -(-first_speech_16k * 3 // 2 // CHUNK)  # 16 kHz sample -> 24 kHz chunk index (ceil)
    latency = done["_t"] - sent_at[chunk - 1]
    print(f"\nBARGE-IN latency {latency*1000:.0f} ms, speech_started->done {(done['_t']-started['_t'])*1000:.0f} ms")
    assert latency < 0.1, f"reply stopped {latency * 1000:.0f} ms after the speech reached the server"
    assert done["_t"] - started["_t"] < 0.1
    rid = done["response"]["id"]
    assert not any(e["type"] == "response.audio.delta" and e["response_id"] == rid for e in after)


def test_bad_input_gets_error_events_and_the_session_survives(server):
    async def main():
        async with Client(server.ws_url) as c:
            await c.until("session.created")
            errors = []

            async def expect_error(raw):
                await c.ws.send(raw)
                ev = await c.until("error")
                errors.append(ev["error"]["code"])

            await expect_error("{not json")
            await expect_error(json.dumps([1, 2]))
            await expect_error(json.dumps({"type": "no.such.event"}))
            await expect_error(json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}))
            await expect_error(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}))
            await expect_error(json.dumps({"type": "session.update", "session": {"voice": "alloy"}}))
            await expect_error(json.dumps({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}))
            await expect_error(json.dumps({"type": "session.update", "session": {"bogus": 1}}))
            await expect_error(json.dumps({"type": "input_audio_buffer.commit"}))
            await expect_error(json.dumps({"type": "response.cancel"}))
            await expect_error(json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": "x"}}))
            await c.ws.send(b"\x00\x01binary")
            errors.append((await c.until("error"))["error"]["code"])
            # Still usable.
            await c.send("session.update", session={"turn_detection": None, "max_response_output_tokens": 5})
            await c.until("session.updated")
            await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                           "content": [{"type": "input_text", "text": "hi"}]})
            await c.send("response.create")
            await c.send("response.create")  # while one is active
            errors.append((await c.until("error"))["error"]["code"])
            done = await c.until("response.done")
            return errors, done

    errors, done = run(main())
    assert errors == ["invalid_json", "invalid_event", "unknown_event", "invalid_value", "invalid_value",
                      "invalid_value", "invalid_value", "invalid_value", "input_audio_buffer_commit_empty",
                      "response_cancel_not_active", "invalid_value", "invalid_event",
                      "conversation_already_has_active_response"]
    assert done["response"]["status"] == "incomplete"


def test_oversized_message_closes_with_1009(server):
    async def main():
        async with Client(server.ws_url) as c:
            await c.until("session.created")
            big = base64.b64encode(b"\x00" * 300 * 1024).decode()
            await c.send("input_audio_buffer.append", audio=big)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await c.recv(5)
            return info.value

    closed = run(main())
    assert closed.rcvd is not None and closed.rcvd.code == 1009


def test_disconnect_mid_reply_frees_the_session(server):
    rt = server.runtime

    async def main():
        async with Client(server.ws_url) as c:
            await c.until("session.created")
            await c.send("session.update", session={"max_response_output_tokens": 4000})
            await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                           "content": [{"type": "input_text", "text": "Go on and on."}]})
            await c.send("response.create")
            await c.until("response.audio.delta")
            assert rt.engine.open_sessions >= 1
        deadline = time.monotonic() + 5
        while (rt.engine.open_sessions or rt.engine.active_requests) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return rt.engine.open_sessions, rt.engine.active_requests

    assert run(main()) == (0, 0)


def test_slow_client_is_dropped_and_others_are_unaffected(server):
    rt = server.runtime
    before = rt.metrics.errors.get(code="slow_client")

    async def main():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        slow = Client(server.ws_url, sock=sock, max_queue=1, close_timeout=0.5)
        async with slow:
            await slow.until("session.created")
            await slow.send("session.update", session={"max_response_output_tokens": 4000, "turn_detection": None})
            await slow.send("conversation.item.create", item={"type": "message", "role": "user",
                                                              "content": [{"type": "input_text", "text": "Talk."}]})
            await slow.send("response.create")
            # ... and never read again. Meanwhile another client is served normally.
            async with Client(server.ws_url) as fast:
                await fast.until("session.created")
                await fast.send("session.update", session={"turn_detection": None, "max_response_output_tokens": 30})
                await fast.send("conversation.item.create", item={"type": "message", "role": "user",
                                                                  "content": [{"type": "input_text", "text": "hi"}]})
                t0 = time.perf_counter()
                await fast.send("response.create")
                done = await fast.until("response.done")
                fast_time = time.perf_counter() - t0
            deadline = time.monotonic() + 20
            while rt.metrics.errors.get(code="slow_client") == before and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            dropped = rt.metrics.errors.get(code="slow_client") > before
            while (rt.engine.open_sessions or rt.connections) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return done, fast_time, dropped, rt.engine.open_sessions + len(rt.connections)

    done, fast_time, dropped, open_after = run(main())
    assert done["response"]["status"] == "incomplete" and fast_time < 10
    assert dropped and open_after == 0


def test_concurrent_sessions_are_batched(server):
    rt = server.runtime
    steps0, rows0 = rt.engine.stats.steps, rt.engine.stats.step_rows

    async def one(i):
        async with Client(server.ws_url) as c:
            await c.until("session.created")
            # seeded: an unseeded random model can sample <|im_end|> early and end its turn
            await c.send("session.update", session={"turn_detection": None, "max_response_output_tokens": 60,
                                                    "seed": i})
            await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                           "content": [{"type": "input_text", "text": f"Question {i}"}]})
            await c.send("response.create")
            return await c.until("response.done")

    async def main():
        return await asyncio.gather(*(one(i) for i in range(4)))

    dones = run(main())
    assert all(d["response"]["usage"]["output_tokens"] == 60 for d in dones), [(d["response"]["status"], d["response"]["status_details"], d["response"]["usage"]) for d in dones]
    steps, rows = rt.engine.stats.steps - steps0, rt.engine.stats.step_rows - rows0
    assert rows / steps > 1.5  # decode steps were shared


def test_transcribe_task_and_voice_change(server):
    async def main():
        async with Client(server.ws_url) as c:
            await c.until("session.created")
            await c.send("session.update", session={"task": "transcribe", "turn_detection": None})
            await c.until("session.updated")
            await c.stream_audio(speech_pcm(), realtime=20.0)
            await c.send("input_audio_buffer.commit")
            committed = await c.until("input_audio_buffer.committed")
            done = await c.until("conversation.item.input_audio_transcription.completed")
            # A new voice means a new system turn, so a new conversation; then it answers.
            await c.send("session.update", session={"task": "chat", "voice": "uk-female",
                                                    "max_response_output_tokens": 10})
            updated = await c.until("session.updated")
            await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                           "content": [{"type": "input_text", "text": "Hello."}]})
            await c.send("response.create")
            answer = await c.until("response.done")
            return c, committed, done, updated, answer

    c, committed, done, updated, answer = run(main())
    assert done["item_id"] == committed["item_id"] and isinstance(done["transcript"], str)
    assert "response.created" not in [t for t in c.types()[: c.types().index("session.updated", 2)]]
    assert updated["session"]["voice"] == "uk-female"
    assert answer["response"]["status"] == "incomplete" and "error" not in c.types()

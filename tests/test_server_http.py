"""The OpenAI-compatible HTTP endpoints, exercised with a real HTTP client against a server on
127.0.0.1 (tiny random model and codec: the words are noise, the mechanics are real)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import pytest

from conftest import tiny_server
import soundfile as sf

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from lfm2_audio.serving.runtime import ServeConfig  # noqa: E402

QUESTION = Path(__file__).parent / "assets" / "question.wav"
FRAME = 1920


@pytest.fixture(scope="module")
def server(tiny_model, tokenizer):
    cfg = ServeConfig(max_sessions=4, max_context=1024, queue_timeout=0.5, max_upload_bytes=512 * 1024,
                      max_new_tokens=40, max_transcript_tokens=40, vad="energy", threads=1)
    with tiny_server(tiny_model, tokenizer, cfg) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def wait_idle(rt, timeout=5.0):
    deadline = time.monotonic() + timeout
    while rt.engine.open_sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    return rt.engine.open_sessions


def sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_models_metrics_page(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["sessions"]["max"] == 4 and h["audio_output"] is True
    assert client.get("/v1/models").json()["data"][0]["id"] == "lfm2-audio"
    page = client.get("/")
    assert page.status_code == 200 and "/v1/realtime" in client.get("/static/app.js").text
    assert "<title>LFM2-Audio voice chat</title>" in page.text
    metrics = client.get("/metrics").text
    for name in ("lfm2_sessions_open", "lfm2_sessions_waiting", "lfm2_time_to_first_audio_seconds_bucket",
                 "lfm2_engine_step_seconds_count", "lfm2_generated_frames_total"):
        assert name in metrics


@pytest.mark.parametrize("fmt", ["json", "text", "verbose_json"])
def test_transcription_formats(client, fmt):
    with open(QUESTION, "rb") as f:
        r = client.post("/v1/audio/transcriptions", files={"file": ("q.wav", f, "audio/wav")},
                        data={"model": "lfm2-audio", "response_format": fmt})
    assert r.status_code == 200, r.text
    if fmt == "text":
        assert r.headers["content-type"].startswith("text/plain")
    else:
        body = r.json()
        assert isinstance(body["text"], str)
        if fmt == "verbose_json":
            assert body["duration"] == pytest.approx(1.78, abs=0.05) and body["segments"][0]["end"] > 1


def test_transcription_streams_sse(client):
    with open(QUESTION, "rb") as f:
        r = client.post("/v1/audio/transcriptions", files={"file": ("q.wav", f)}, data={"stream": "true"})
    events = sse_events(r.text)
    assert events[-1]["type"] == "transcript.text.done"
    assert all(e["type"] == "transcript.text.delta" for e in events[:-1])


def test_transcription_bad_input(client):
    def err(r, status, code):
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code

    err(client.post("/v1/audio/transcriptions", data={"model": "x"}), 400, "invalid_content_type")
    err(client.post("/v1/audio/transcriptions", files={"other": ("a", b"x")}), 400, "missing_field")
    err(client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"")}), 400, "invalid_audio")
    err(client.post("/v1/audio/transcriptions", files={"file": ("a.mp4", b"\x00\x01 not audio at all" * 50)}),
        400, "invalid_audio")
    with open(QUESTION, "rb") as f:
        err(client.post("/v1/audio/transcriptions", files={"file": ("q.wav", f)}, data={"response_format": "srt"}),
            400, "invalid_value")
    big = b"RIFF" + b"\x00" * (600 * 1024)
    err(client.post("/v1/audio/transcriptions", files={"file": ("big.wav", big)}), 413, "too_large")

    def chunked():  # no Content-Length: the limit still applies while streaming the body
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
        for _ in range(80):
            yield b"\x00" * 8192
    r = client.post("/v1/audio/transcriptions", content=chunked(),
                    headers={"content-type": "multipart/form-data; boundary=b"})
    err(r, 413, "too_large")


def test_speech_streams_wav_and_pcm(client):
    r = client.post("/v1/audio/speech", json={"model": "lfm2-audio", "input": "Hello there.", "voice": "uk-female",
                                             "max_tokens": 12, "seed": 1})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    wave, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 24000
    # <|audio_start|> is forced, then up to 11 frames (an end-of-audio frame may come earlier).
    assert 0 < wave.size <= 11 * FRAME and wave.size % 480 == 0
    r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "us-male", "response_format": "pcm",
                                             "max_tokens": 6, "seed": 1})
    assert r.headers["content-type"] == "audio/pcm" and len(r.content) % 2 == 0 and len(r.content) > 0
    r = client.post("/v1/audio/speech", json={"input": "Hi.", "stream_format": "sse", "max_tokens": 6})
    events = sse_events(r.text)
    assert events[-1]["type"] == "speech.audio.done"
    assert sum(len(base64.b64decode(e["audio"])) for e in events[:-1]) > 0


def test_speech_bad_input(client):
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps({"voice": "us-male"}).encode(), 400, "missing_field"),
        (json.dumps({"input": "  "}).encode(), 400, "invalid_value"),
        (json.dumps({"input": "hi", "voice": "alloy"}).encode(), 400, "invalid_value"),
        (json.dumps({"input": "hi", "response_format": "mp3"}).encode(), 400, "invalid_value"),
        (json.dumps({"input": "hi", "speed": 1.5}).encode(), 400, "unsupported_value"),
        (json.dumps({"input": 5}).encode(), 400, "invalid_type"),
    ]
    for body, status, code in cases:
        r = client.post("/v1/audio/speech", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and r.json()["error"]["code"] == code, (body, r.text)


def test_chat_text_and_audio(client):
    r = client.post("/v1/chat/completions", json={"model": "lfm2-audio", "max_tokens": 10,
                                                 "messages": [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hello?"}]})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] <= 10 and body["usage"]["prompt_tokens"] > 5

    audio_b64 = base64.b64encode(QUESTION.read_bytes()).decode()
    r = client.post("/v1/chat/completions", json={
        "modalities": ["text", "audio"], "audio": {"voice": "us-female", "format": "wav"}, "max_tokens": 30,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Listen:"},
                                                  {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}}]}]})
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    wave, rate = sf.read(io.BytesIO(base64.b64decode(msg["audio"]["data"])), dtype="float32")
    assert rate == 24000 and wave.size > 0 and isinstance(msg["audio"]["transcript"], str)
    # The random model may end its turn early; a reply cut by max_tokens says so.
    done = r.json()["usage"]["completion_tokens"]
    assert r.json()["choices"][0]["finish_reason"] == ("length" if done >= 30 else "stop") and 0 < done <= 30


def test_chat_streams_sse_with_audio(client):
    r = client.post("/v1/chat/completions", json={
        "modalities": ["text", "audio"], "audio": {"format": "pcm16"}, "stream": True, "max_tokens": 30,
        "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "Talk to me."}]})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e.get("choices")]
    assert deltas[0]["role"] == "assistant"
    audio = b"".join(base64.b64decode(d["audio"]["data"]) for d in deltas if "data" in d.get("audio", {}))
    text = "".join(d["audio"]["transcript"] for d in deltas if "transcript" in d.get("audio", {}))
    assert len(audio) > 0 and len(audio) % 2 == 0 and isinstance(text, str)
    assert events[-2]["usage"]["completion_tokens"] == 30


def test_chat_bad_input(client):
    def post(body):
        return client.post("/v1/chat/completions", json=body)

    cases = [
        ({}, "missing_field"),
        ({"messages": []}, "invalid_value"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "invalid_value"),
        ({"messages": [{"role": "system", "content": "only a system message"}]}, "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "unsupported_content"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}]}, "invalid_audio"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"garbage" * 30).decode()}}]}]}, "invalid_audio"),
        ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["audio"]}, "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "invalid_request"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "invalid_type"),
    ]
    for body, code in cases:
        r = post(body)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)


def test_context_overflow_is_a_400(server, tokenizer):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 2000}]})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_client_disconnect_frees_the_session(server, client):
    rt = server.runtime
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/audio/speech", json={"input": "A long story.", "max_tokens": 4000}) as r:
            it = r.iter_bytes()
            next(it)
            assert rt.engine.open_sessions == 1
        # leaving the block closes the connection mid-reply
    assert wait_idle(rt) == 0
    assert client.post("/v1/audio/speech", json={"input": "Still here?", "max_tokens": 4}).status_code == 200


def test_busy_server_answers_503_and_others_are_unaffected(server, client):
    rt = server.runtime
    stop = threading.Event()
    results = []

    def long_stream():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", "/v1/audio/speech", json={"input": "Go on.", "max_tokens": 4000}) as r:
                n = 0
                for chunk in r.iter_bytes():
                    n += len(chunk)
                    if stop.is_set():
                        break
                results.append(n)

    threads = [threading.Thread(target=long_stream) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while rt.engine.open_sessions < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    r = client.post("/v1/audio/speech", json={"input": "me too", "max_tokens": 4})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
    assert r.headers.get("retry-after") == "1"
    assert time.monotonic() - t0 >= 0.4  # it waited its queue_timeout for a free session
    stop.set()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(n > 0 for n in results)
    assert wait_idle(rt) == 0
    assert client.post("/v1/audio/speech", json={"input": "now?", "max_tokens": 4}).status_code == 200


def test_transcription_is_capped_by_the_audio_length(server, client, monkeypatch):
    # as in LFM2Audio.transcribe: 10 tokens per second of audio + 16 (1.78 s -> 33), under the
    # server's max_transcript_tokens (40), so a model caught in a loop stops early
    rt, seen = server.runtime, []
    reply = type(rt).reply
    monkeypatch.setattr(type(rt), "reply", lambda self, s, turns, params, *a, **kw:
                        seen.append(params.max_new_tokens) or reply(self, s, turns, params, *a, **kw))
    with open(QUESTION, "rb") as f:
        assert client.post("/v1/audio/transcriptions", files={"file": ("q.wav", f)}).status_code == 200
    assert seen == [33]


def test_transcription_decodes_as_the_model_says(server, client, monkeypatch):
    # a model whose config.json asks for a beam scored by its CTC head gets it from the server
    # too: the transcript is LFM2Audio.transcribe's
    from lfm2_audio.generation.beam import AsrDecoding
    from lfm2_audio.pipeline import LFM2Audio

    rt = server.runtime
    decoding = AsrDecoding(beam=3, ctc_weight=0.5)
    monkeypatch.setattr(rt.lfm, "asr_decoding", decoding, raising=False)
    with open(QUESTION, "rb") as f:
        r = client.post("/v1/audio/transcriptions", files={"file": ("q.wav", f)}, data={"response_format": "json"})
    assert r.status_code == 200
    lfm = LFM2Audio(rt.lfm.model.model if hasattr(rt.lfm.model, "model") else rt.lfm.model, rt.lfm.tokenizer)
    lfm.asr_decoding = decoding
    assert r.json()["text"] == lfm.transcribe(QUESTION, max_new_tokens=rt.config.max_transcript_tokens)

"""`lfm2-audio serve` as a process: it starts on a checkpoint, serves, and on SIGTERM finishes
the reply in flight, refuses new work and exits 0."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sync_client = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402

from lfm2_audio.cli import build_parser  # noqa: E402
from lfm2_audio.serving.testing import make_tiny_checkpoint  # noqa: E402

ASSETS = Path(__file__).parent / "assets"


def test_serve_and_demo_are_subcommands():
    args = build_parser().parse_args(["serve", "--model", "x", "--port", "0", "--max-sessions", "3"])
    assert args.command == "serve" and args.max_sessions == 3 and args.host == "127.0.0.1"
    assert build_parser().parse_args(["demo"]).port == 7860


def test_serve_process_drains_on_sigterm(tmp_path, tiny_model):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", ASSETS / "tokenizer.json", model=tiny_model)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lfm2_audio.cli", "serve", "--model", str(ckpt), "--port", "0", "--threads", "1",
         "--vad", "energy", "--shutdown-timeout", "30", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0]
        assert url, "".join(lines)
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
        assert httpx.get(url + "/health").json()["status"] == "ok"

        got_first, result = threading.Event(), {}

        def long_request():
            with httpx.Client(timeout=120) as c:
                with c.stream("POST", url + "/v1/audio/speech", json={"input": "A longer one.", "max_tokens": 200,
                                                                      "seed": 0}) as r:
                    data = b""
                    for chunk in r.iter_bytes():
                        data += chunk
                        got_first.set()
                    result["data"] = data

        t = threading.Thread(target=long_request)
        t.start()
        assert got_first.wait(60)
        ws = sync_client.connect(url.replace("http", "ws") + "/v1/realtime")
        assert json.loads(ws.recv(30))["type"] == "session.created"
        proc.send_signal(signal.SIGTERM)
        notice = json.loads(ws.recv(30))
        assert notice["type"] == "error" and notice["error"]["code"] == "server_shutting_down"
        time.sleep(0.3)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(url + "/v1/audio/speech", json={"input": "more", "max_tokens": 4})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        t.join(120)
        wave, rate = sf.read(io.BytesIO(result["data"]), dtype="float32")
        assert rate == 24000 and wave.size > 100 * 1920  # the reply in flight ran to its end
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(30)
        assert closed.value.rcvd.code == 1001
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

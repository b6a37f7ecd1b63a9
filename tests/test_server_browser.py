"""The web page end to end in headless Chromium: a fake microphone plays a spoken question
(a WAV file), the page streams it to /v1/realtime, the server's VAD ends the turn, and the
page must receive and play the answer. Driven over the DevTools protocol (no Playwright
download needed). Skipped when Chromium is not installed (Debian: apt-get install chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_server
import soundfile as sf

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sync_client = pytest.importorskip("websockets.sync.client")

from lfm2_audio.serving.runtime import ServeConfig  # noqa: E402

QUESTION = Path(__file__).parent / "assets" / "question.wav"
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")


class Page:
    """The smallest DevTools-protocol client: evaluate JavaScript in one page."""

    def __init__(self, ws_url: str):
        self.ws = sync_client.connect(ws_url, max_size=None)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def eval(self, expression: str, gesture: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True,
                           userGesture=gesture)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def close(self):
        self.ws.close()


@pytest.fixture(scope="module")
def server(tiny_model, tokenizer):
    cfg = ServeConfig(max_sessions=4, max_context=2048, max_new_tokens=40, max_transcript_tokens=20, threads=1)
    with tiny_server(tiny_model, tokenizer, cfg) as s:
        yield s


@pytest.fixture()
def mic_file(tmp_path):
    """The question with silence around it: the VAD needs the pause to end the turn."""
    a, rate = sf.read(QUESTION, dtype="float32")
    a = np.concatenate([np.zeros(rate // 2, np.float32), a, np.zeros(5 * rate, np.float32)])
    path = tmp_path / "mic.wav"
    sf.write(path, a, rate, subtype="PCM_16")
    return path


def launch(url: str, mic: Path, profile: Path):
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
         "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
         f"--use-file-for-fake-audio-capture={mic}%noloop", "--autoplay-policy=no-user-gesture-required",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    port = None
    while port is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if m:
            port = int(m.group(1))
    if port is None:
        proc.kill()
        pytest.fail("Chromium did not start its DevTools endpoint")
    # Keep reading stderr so Chromium never blocks on a full pipe.
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    while time.monotonic() < deadline:
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        if pages and pages[0]["url"].startswith(url):
            return proc, pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the page did not open")


def press_start(page: Page) -> None:
    """Wait for the page's script, then press Start (with a user gesture, so audio may play)."""
    deadline = time.monotonic() + 30
    while not page.eval("!!(document.getElementById('start') && window.lfm)") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.eval("!!window.lfm"), page.eval("location.href + ' ' + document.documentElement.outerHTML.slice(0, 500)")
    page.eval("document.getElementById('start').click()", gesture=True)


def poll_state(page: Page, done, timeout: float = 90) -> dict:
    """The page's `window.lfm` state, polled until done(state) or the timeout."""
    state, deadline = {}, time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(page.eval("JSON.stringify(window.lfm)"))
        if done(state):
            break
        time.sleep(0.25)
    return state


def test_page_hears_the_question_and_plays_an_answer(server, mic_file, tmp_path):
    proc, ws_url = launch(server.url + "/", mic_file, tmp_path / "profile")
    page = Page(ws_url)
    try:
        press_start(page)
        # until the answer has been played to its end
        state = poll_state(page, lambda s: s["responsesDone"] >= 1 and 0 < s["samplesQueued"] == s["samplesPlayed"])
        transcript = page.eval("document.getElementById('log').innerText")
    finally:
        page.close()
        proc.kill()
        proc.wait()
    assert state.get("connected"), state
    assert state["errors"] == [], state
    assert state["speechStarted"] >= 1 and state["speechStopped"] >= 1, state  # it heard the question...
    assert state["committed"] >= 1 and state["responses"] >= 1, state
    assert state["audioChunks"] > 0 and state["samplesPlayed"] > 0, state  # ... and played an answer
    assert state["samplesPlayed"] >= 24000 // 2, state  # at least half a second of it
    assert transcript.strip(), "nothing in the live transcript"


def test_talking_over_the_answer_interrupts_it(server, tmp_path):
    a, rate = sf.read(QUESTION, dtype="float32")
    gap = np.zeros(int(1.5 * rate), np.float32)
    mic = tmp_path / "mic2.wav"
    sf.write(mic, np.concatenate([gap[: rate // 2], a, gap, a, np.zeros(3 * rate, np.float32)]), rate, subtype="PCM_16")
    rt = server.runtime
    rt.config.max_new_tokens = 3000  # an answer long enough to still be running when the user talks again
    proc, ws_url = launch(server.url + "/", mic, tmp_path / "profile2")
    page = Page(ws_url)
    try:
        press_start(page)
        state = poll_state(page, lambda s: s["cancelled"] >= 1 and s["responses"] >= 2)
        cut = page.eval("document.querySelectorAll('.assistant.cut').length")
    finally:
        rt.config.max_new_tokens = 40
        page.close()
        proc.kill()
        proc.wait()
    assert state["errors"] == [], state
    assert state["speechStarted"] >= 2 and state["cancelled"] >= 1 and state["responses"] >= 2, state
    assert cut >= 1

"""`lfm2-audio demo`: the Gradio app on the serving engine answers a recorded question.
Skipped unless the `demo` extra (Gradio) is installed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from lfm2_audio.pipeline import LFM2Audio  # noqa: E402
from lfm2_audio.serving.app import create_app  # noqa: E402
from lfm2_audio.serving.gradio_app import build_demo  # noqa: E402
from lfm2_audio.serving.runtime import Runtime, ServeConfig  # noqa: E402
from lfm2_audio.serving.testing import ServerThread, tiny_codec  # noqa: E402

QUESTION = Path(__file__).parent / "assets" / "question.wav"


def test_demo_answers_a_recorded_question(tiny_model, tokenizer):
    threads = torch.get_num_threads()
    rt = Runtime(LFM2Audio(tiny_model, tokenizer, tiny_codec()), ServeConfig(max_new_tokens=30, threads=1))
    app = gr.mount_gradio_app(create_app(rt), build_demo(rt), path="/demo")
    try:
        with ServerThread(rt, app=app) as server:
            client = gradio_client.Client(server.url + "/demo/", verbose=False)
            chat, audio, _, _ = client.predict(gradio_client.handle_file(str(QUESTION)), "and?", "Speech + text", "uk-male",
                                               api_name="/respond")
            assert chat[0]["role"] == "user" and chat[1]["role"] == "assistant"
            assert audio and Path(audio).stat().st_size > 1000  # the spoken answer
            chat, audio, _, _ = client.predict(None, "Just text, please.", "Text only", "", api_name="/respond")
            assert chat[-1]["role"] == "assistant"
            deadline = time.monotonic() + 5
            while rt.engine.open_sessions and time.monotonic() < deadline:
                time.sleep(0.02)
            assert rt.engine.open_sessions == 0  # each answer's session was closed
    finally:
        torch.set_num_threads(threads)

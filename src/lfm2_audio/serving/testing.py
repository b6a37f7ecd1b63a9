"""A tiny random checkpoint with a tiny random codec, for server tests and the load benchmark.

The outputs are noise, but every mechanism the server has (prefill, batching, switching,
codec streaming, cancellation) runs for real, in milliseconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TINY_CODEC = dict(
    vocab_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=192, block_multiple_of=32, layer_types=["conv", "sliding_attention"], sliding_window=30,
)


def tiny_codec(seed: int = 0):
    """A Detokenizer (the LFM2.5 codec) at toy size, with weights small enough that its
    spectra stay quiet (a random one at default init saturates every sample)."""
    from ..codec.detokenizer import Detokenizer
    from ..config import Lfm2Config

    torch.manual_seed(seed)
    codec = Detokenizer(Lfm2Config.from_dict(dict(TINY_CODEC)))
    with torch.no_grad():
        for name, p in codec.named_parameters():
            if "norm" in name:
                continue
            p.normal_(0.0, 0.02)
        half = codec.lin.bias.shape[0] // 2
        codec.lin.bias[:half] = -4.0  # log-magnitudes: quiet
    return codec.eval()


def make_tiny_checkpoint(directory, tokenizer_file, seed: int = 0, model=None) -> Path:
    """Write a tiny random LFM2-Audio checkpoint (with `audio_detokenizer/`) to `directory`."""
    from ..cli import TINY_CONFIG
    from ..config import LFM2AudioConfig
    from ..model.lfm2_audio import random_model

    directory = Path(directory)
    if model is None:
        model = random_model(LFM2AudioConfig.from_dict(json.loads(TINY_CONFIG)), seed=seed)
    model.save_pretrained(directory)
    shutil.copy(tokenizer_file, directory / "tokenizer.json")
    codec = tiny_codec(seed)
    codec_dir = directory / "audio_detokenizer"
    codec_dir.mkdir(exist_ok=True)
    (codec_dir / "config.json").write_text(json.dumps(TINY_CODEC))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in codec.state_dict().items()}, str(codec_dir / "model.safetensors"))
    return directory


class ServerThread:
    """Serve a Runtime on 127.0.0.1 (a free port) from a background thread:

        with ServerThread(runtime) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, runtime, host: str = "127.0.0.1", port: int = 0, sndbuf: int | None = None, app=None):
        """sndbuf: a fixed kernel send buffer for every connection (accepted sockets inherit
        it from the listening one), so that a client that stops reading pushes back within
        kilobytes rather than the megabytes loopback autotuning allows."""
        import socket

        from .server import make_server

        self.runtime = runtime
        self.server = make_server(runtime, host, port, log_level="warning", app=app)
        self.server.announce = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sndbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.bind((host, port))
        self.thread = None

    def __enter__(self) -> "ServerThread":
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="lfm2-test-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url, self.ws_url = f"http://{host}:{port}", f"ws://{host}:{port}"
        self.port = port
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

import contextlib
import json
from pathlib import Path

import pytest
import torch

from lfm2_audio.cli import TINY_CONFIG
from lfm2_audio.config import LFM2AudioConfig
from lfm2_audio.model.lfm2_audio import random_model
from lfm2_audio.processor import Tokenizer

ASSETS = Path(__file__).parent / "assets"
SHARED_FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/reference-tiny"

torch.set_num_threads(2)


def tiny_config(**overrides) -> LFM2AudioConfig:
    data = json.loads(TINY_CONFIG)
    data.update(overrides)
    return LFM2AudioConfig.from_dict(data)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(ASSETS / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_model():
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(d)
    (d / "tokenizer.json").write_bytes((ASSETS / "tokenizer.json").read_bytes())
    return d


@contextlib.contextmanager
def tiny_server(model, tokenizer, cfg, **server_kwargs):
    """A real server on loopback over `model` with the tiny codec; restores torch's thread count
    (the runtime sets it from cfg.threads) when it stops."""
    from lfm2_audio.pipeline import LFM2Audio
    from lfm2_audio.serving.runtime import Runtime
    from lfm2_audio.serving.testing import ServerThread, tiny_codec

    threads = torch.get_num_threads()
    try:
        with ServerThread(Runtime(LFM2Audio(model, tokenizer, tiny_codec()), cfg), **server_kwargs) as server:
            yield server
    finally:
        torch.set_num_threads(threads)


def prompted_conversation(model, seed=1):
    """A conversation with text, 2.5 s of random audio features and the assistant's turn open."""
    from lfm2_audio.generation.chat import Conversation

    g = torch.Generator().manual_seed(seed)
    conv = Conversation(model, tokenizer=None)
    conv.add_tokens(torch.randint(200, 1000, (12,), generator=g).tolist())
    conv.add_features(torch.randn(128, 250, generator=g))
    conv.add_tokens([5, 6, 9, 11])
    conv.role = "assistant"
    return conv

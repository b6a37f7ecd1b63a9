"""Beam search for transcripts and its CTC prefix scores (generation/beam.py)."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lfm2_audio.config import LFM2AudioConfig
from lfm2_audio.errors import InputError
from lfm2_audio.generation.beam import AsrDecoding, CTCPrefixScorer, asr_decoding_default, beam_transcript
from lfm2_audio.generation.chat import SYSTEM_PROMPTS
from lfm2_audio.generation.generate import generate
from lfm2_audio.pipeline import LFM2Audio


def _collapse(path):
    out, prev = [], None
    for s in path:
        if s != prev and s != 0:
            out.append(s)
        prev = s
    return out


def test_ctc_prefix_scores_match_counting_every_alignment():
    T, V, END = 4, 4, 3
    x = torch.randn(T, V, generator=torch.Generator().manual_seed(0)).double().log_softmax(-1)
    paths = [(p, float(sum(x[t, s] for t, s in enumerate(p)))) for p in itertools.product(range(V), repeat=T)]

    def starts_with(prefix):  # P(the collapsed labels begin with prefix)
        return math.log(sum(math.exp(lp) for p, lp in paths if _collapse(p)[: len(prefix)] == prefix))

    scorer = CTCPrefixScorer(x, END)
    n, b = scorer.empty(1)
    last = torch.tensor([-1])
    prefix = []
    for token in (1, 1, 2):  # a repeated token needs a blank between its two copies
        tokens = torch.tensor([[token, 2, END]])
        score, n_next, b_next = scorer.extend(n, b, last, tokens)
        assert score[0, 0].item() == pytest.approx(starts_with(prefix + [token]), abs=1e-9)
        assert score[0, 1].item() == pytest.approx(starts_with(prefix + [2]), abs=1e-9)
        # the end token scores the prefix as the whole transcript: CTC's own likelihood
        if prefix:
            whole = -F.ctc_loss(x[:, None], torch.tensor([prefix]), [T], [len(prefix)], reduction="sum")
            assert score[0, 2].item() == pytest.approx(whole.item(), abs=1e-9)
        prefix.append(token)
        n, b, last = n_next[:, :, 0], b_next[:, :, 0], torch.tensor([token])


def tone(seconds=1.0, rate=16000, freq=220.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _asr_conversation(lfm):
    conv = lfm.chat(system=SYSTEM_PROMPTS["asr"])
    conv.turn("user", tone(1.5), sample_rate=16000)
    return conv


def test_a_beam_of_one_without_ctc_is_greedy(tiny_model, tokenizer):
    lfm = LFM2Audio(tiny_model, tokenizer)
    greedy = []
    for e in generate(_asr_conversation(lfm), "sequential", max_new_tokens=12):
        if e.kind != "text" or e.token in (tokenizer.im_end_id, tokenizer.audio_start_id):
            break
        greedy.append(e.token)
    conv = _asr_conversation(lfm)
    conv.new_turn("assistant")
    got = beam_transcript(conv, AsrDecoding(beam=1), max_new_tokens=12)
    assert got[: len(greedy)] == greedy and len(greedy) >= 3  # the random model talks a while


def test_wider_beams_and_ctc_weights_give_transcripts(tiny_model, tokenizer):
    lfm = LFM2Audio(tiny_model, tokenizer)
    for beam, w in ((4, 0.0), (4, 0.5), (3, 1.0)):
        conv = _asr_conversation(lfm)
        conv.new_turn("assistant")
        ids = beam_transcript(conv, AsrDecoding(beam=beam, ctc_weight=w), max_new_tokens=10)
        assert 0 < len(ids) <= 10 and tokenizer.im_end_id not in ids
    text = lfm.transcribe(tone(1.5), sample_rate=16000, beam=2, ctc_weight=0.5)
    assert isinstance(text, str)
    conv = lfm.chat(system=SYSTEM_PROMPTS["asr"])
    conv.turn("user", "no audio here")
    with pytest.raises(InputError, match="needs an audio clip"):
        beam_transcript(conv, AsrDecoding(beam=2, ctc_weight=0.5), max_new_tokens=10)


def test_decoding_settings_come_from_the_model_config():
    assert asr_decoding_default({}) == AsrDecoding() and AsrDecoding().greedy
    own = asr_decoding_default({"asr_decoding": {"beam": 4, "ctc_weight": 0.5}})
    assert own == AsrDecoding(4, 0.5) and not own.greedy
    assert own.overridden() == own and own.overridden(beam=1, ctc_weight=0).greedy
    for bad in ({"beam": 0}, {"beam": 2.5}, {"ctc_weight": 1.5}, {"width": 3}, [4]):
        with pytest.raises(InputError, match="beam|ctc_weight|asr_decoding"):
            asr_decoding_default({"asr_decoding": bad})
    # a key of this project's own: kept through a save without the unknown-key warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = LFM2AudioConfig.from_dict({"asr_decoding": {"beam": 4}})
    assert cfg.to_dict()["asr_decoding"] == {"beam": 4}


def test_the_fast_engine_finds_the_same_transcripts(tiny_model, tokenizer):
    from lfm2_audio.generation.fast import FastLFM2Audio

    fast = LFM2Audio(FastLFM2Audio(tiny_model, exact=True), tokenizer)
    plain = LFM2Audio(tiny_model, tokenizer)
    for decoding in (AsrDecoding(beam=4), AsrDecoding(beam=3, ctc_weight=0.5)):
        got = []
        for lfm in (plain, fast):
            conv = _asr_conversation(lfm)
            conv.new_turn("assistant")
            got.append(beam_transcript(conv, decoding, max_new_tokens=10))
        assert got[0] == got[1]

"""The bundled demo model: small enough to ship, loads strictly, and really listens and speaks."""

from pathlib import Path

import numpy as np
import pytest

from lfm2_audio.pipeline import DEMO_MODEL, LFM2Audio

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "lfm2_audio" / "assets" / "examples"

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "config.json").exists(),
                                reason="the demo model is not bundled in this checkout (recipes/demo/run.sh builds it)")


@pytest.fixture(scope="module")
def demo():
    return LFM2Audio.from_pretrained(threads=0)  # no --model: the bundled one


def test_bundle_is_under_60_mb_and_complete():
    files = {p.relative_to(DEMO_MODEL).as_posix(): p.stat().st_size for p in DEMO_MODEL.rglob("*") if p.is_file()}
    assert sum(files.values()) < 60e6, files
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "codec/config.json",
                 "codec/codebooks.safetensors"):
        assert name in files, name


def _words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()


def test_demo_transcribes_a_held_out_sentence(demo):
    # its config.json decodes with a beam of 3 and its CTC head (held out: 64.9% WER, greedy 75.3%)
    from lfm2_audio.generation.beam import AsrDecoding

    assert demo.asr_decoding == AsrDecoding(beam=3, ctc_weight=0.3)
    ref = set(_words("He opened the meeting with a long speech."))
    beam = demo.transcribe(EXAMPLES / "sentence.wav", max_new_tokens=60)
    greedy = demo.transcribe(EXAMPLES / "sentence.wav", max_new_tokens=60, beam=1, ctc_weight=0)
    for text in (beam, greedy):
        assert len(ref & set(_words(text))) >= len(ref) // 2, text


def test_demo_answers_a_spoken_question_in_text_and_speech(demo):
    reply = demo.complete(demo.chat(), EXAMPLES / "question.wav", max_new_tokens=200, seed=0)
    assert "friday" in _words(reply.text), reply.text  # "Which day follows Thursday?"
    assert reply.reason == "end_of_turn"
    assert reply.sample_rate == 24000 and len(reply.audio) > 0.5 * 24000
    assert np.abs(reply.audio).max() > 0.05  # speech, not silence


def test_demo_chats_with_greedy_speech_by_its_config(demo, monkeypatch):
    # measured on the held-out set: the model's own sampled speech misleads its text after it
    from lfm2_audio import pipeline
    from lfm2_audio.generation.sampling import TTS_AUDIO, Sampling

    assert demo.audio_sampling == {"chat": Sampling(0.0, 4), "tts": TTS_AUDIO}
    seen = []
    monkeypatch.setattr(pipeline, "generate", lambda conv, mode, text_s, audio_s, *a, **k: seen.append(audio_s) or iter(()))
    list(demo.respond(demo.chat(), "hi"))
    list(demo.respond(demo.chat(), "hi", audio_sampling=Sampling(1.0, 4)))
    assert seen == [Sampling(0.0, 4), Sampling(1.0, 4)]

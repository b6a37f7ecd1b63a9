"""Prompt format, cross-turn caching, the two modes' switching rules, sampling, bad input."""

import math

import numpy as np
import pytest
import torch

from lfm2_audio.config import END_OF_AUDIO
from lfm2_audio.errors import InputError
from lfm2_audio.generation.chat import Conversation, embed_pending
from lfm2_audio.generation.generate import generate
from lfm2_audio.generation.sampling import Sampling, sample


def tone(seconds=1.0, rate=16000, freq=220.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def test_asr_prompt_layout(tiny_model, tokenizer):
    conv = Conversation(tiny_model, tokenizer, system="Perform ASR.")
    conv.turn("user", tone(1.0), sample_rate=16000)
    conv.new_turn("assistant")
    enc = tokenizer.encode
    want_text = [tokenizer.bos_id] + enc("<|im_start|>system\n") + enc("Perform ASR.") + enc("<|im_end|>\n") \
        + enc("<|im_start|>user\n") + enc("<|im_end|>\n") + enc("<|im_start|>assistant\n")
    assert conv.record.text == want_text
    assert enc("<|im_start|>user\n")[0] == tokenizer.im_start_id  # specials are single ids
    n_audio = math.ceil(101 / 8)  # 1 s -> 101 mel frames (terminal frame included) -> 13
    flags = conv.record.modality
    assert flags.count(2) == n_audio and len(flags) == len(want_text) + n_audio
    first_audio = flags.index(2)
    assert first_audio == 1 + len(enc("<|im_start|>system\n") + enc("Perform ASR.") + enc("<|im_end|>\n") + enc("<|im_start|>user\n"))
    assert flags[first_audio : first_audio + n_audio] == [2] * n_audio  # no tokens around audio


def _full_recompute(conv: Conversation) -> torch.Tensor:
    m, rec = conv.model, conv.record
    audio_in = m.encode_audio(rec.audio_in)
    out = torch.cat(rec.audio_out) if rec.audio_out else torch.zeros(0, 8, dtype=torch.long)
    emb = m.embed_inputs(torch.tensor(rec.text), audio_in, out, torch.tensor(rec.modality))
    return m.lfm(emb[None])[0]


@torch.no_grad()
def test_cache_across_turns_equals_full_prefill(tiny_model, tokenizer):
    conv = Conversation(tiny_model, tokenizer, system="Respond with interleaved text and audio.")
    conv.turn("user", tone(1.2), sample_rate=16000)
    events = list(generate(conv, "interleaved", max_new_tokens=25))
    assert events[-1].kind == "end"
    assert conv.role is None  # the assistant turn was closed
    conv.turn("user", "and now?", tone(0.5, freq=330), sample_rate=16000)
    conv.new_turn("assistant")
    pending = conv.pending_embeddings()
    h_incremental = conv.run(pending)[-1]
    h_full = _full_recompute(conv)[-1]
    assert torch.allclose(h_incremental, h_full, atol=1e-5, rtol=1e-4)
    assert conv.cache.max_len == len(conv.record.modality)


def test_turns_of_several_conversations_embed_in_one_encoder_batch(tiny_model, tokenizer):
    convs = []
    for seconds, freq in ((1.2, 220), (0.5, 330), (2.0, 440)):
        c = Conversation(tiny_model, tokenizer)
        c.turn("user", "listen:", tone(seconds, freq=freq), sample_rate=16000)
        convs.append(c)
    convs.append(Conversation(tiny_model, tokenizer, system="text only"))
    alone = []
    for c in convs:
        saved = list(c.pending)
        alone.append(c.pending_embeddings())
        c.pending = saved
    together = embed_pending(convs)
    assert [e.shape for e in together] == [e.shape for e in alone]
    for a, b in zip(together, alone):  # padded to the longest clip, the same vectors
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(c.pending == [] for c in convs)


class Scripted:
    """Makes the model say a fixed script: text tokens via one-hot logits, frames as given."""

    def __init__(self, monkeypatch, model, tokens, frames, vocab=1024):
        self.tokens, self.frames, self.vocab = list(tokens), list(frames), vocab
        monkeypatch.setattr(model, "text_logits", self.text_logits)
        monkeypatch.setattr(model, "sample_frame", self.sample_frame)

    def text_logits(self, h):
        logits = torch.zeros(self.vocab)
        logits[self.tokens.pop(0)] = 1.0
        return logits

    def sample_frame(self, h, params=None, generator=None, return_logits=False):
        frame = torch.tensor([self.frames.pop(0)])
        return (frame, torch.zeros(1, 8, 2049)) if return_logits else frame


def _kinds(events):
    return "".join({"text": "t", "audio": "a"}.get(e.kind, "") for e in events if e.kind != "end" and (e.kind != "text" or e.token is not None))


def test_interleaved_switching_rules(monkeypatch, tiny_model, tokenizer):
    words = tokenizer.encode(" one two three four five six seven eight")[:8]
    frame = [5] * 8
    eoa = [END_OF_AUDIO] + [7] * 7
    Scripted(monkeypatch, tiny_model, words[:6] + words[6:8] + [tokenizer.text_end_id, tokenizer.im_end_id],
             [frame] * 12 + [frame] * 4 + [eoa])
    conv = Conversation(tiny_model, tokenizer)
    conv.turn("user", "hi")
    events = list(generate(conv, "interleaved", max_new_tokens=100))
    # 6 text, 12 audio, text until <|text_end|>, audio until end-of-audio, then <|im_end|> (not yielded)
    assert _kinds(events) == "t" * 6 + "a" * 12 + "ttt" + "a" * 5
    assert events[-1].reason == "end_of_turn"
    last_frame = [e for e in events if e.kind == "audio"][-1]
    assert last_frame.is_end_of_audio and (last_frame.frame == END_OF_AUDIO).all()  # whole frame ends
    # history: generated tokens incl. <|text_end|>, then exactly one <|im_end|>\n
    tail = conv.record.text[-(len(tokenizer.encode("<|im_end|>\n")) + 1):]
    assert tail == [tokenizer.text_end_id] + tokenizer.encode("<|im_end|>\n")
    assert sum(f.shape[0] for f in conv.record.audio_out) == 17


def test_interleaved_text_ends_early(monkeypatch, tiny_model, tokenizer):
    w = tokenizer.encode(" one two")[:2]
    Scripted(monkeypatch, tiny_model, w + [tokenizer.text_end_id, tokenizer.im_end_id],
             [[9] * 8] * 20 + [[END_OF_AUDIO] * 8])
    conv = Conversation(tiny_model, tokenizer)
    conv.turn("user", "hi")
    events = list(generate(conv, "interleaved", max_new_tokens=100))
    assert _kinds(events) == "ttt" + "a" * 21  # audio runs on past 12 once text is done


def test_forced_frames_replace_the_speech_and_end_it(monkeypatch, tiny_model, tokenizer):
    words = tokenizer.encode(" one two three four five six seven eight")[:8]
    Scripted(monkeypatch, tiny_model, words + [tokenizer.text_end_id, tokenizer.im_end_id], [[5] * 8] * 40)
    given = torch.arange(14 * 8).view(14, 8) % 2048
    conv = Conversation(tiny_model, tokenizer)
    conv.turn("user", "hi")
    events = list(generate(conv, "interleaved", max_new_tokens=100, force_frames=given))
    frames = [e.frame for e in events if e.kind == "audio"]
    # the model's text goes on as usual; its speech is the given frames, then end-of-audio
    assert _kinds(events) == "t" * 6 + "a" * 12 + "ttt" + "a" * 3
    assert torch.equal(torch.stack(frames[:14]), given) and (frames[14] == END_OF_AUDIO).all()
    for bad in (torch.zeros(3, 7, dtype=torch.long), torch.full((2, 8), END_OF_AUDIO)):
        with pytest.raises(InputError, match="force_frames"):
            list(generate(Conversation(tiny_model, tokenizer), "interleaved", force_frames=bad))


def test_sequential_switching_rules(monkeypatch, tiny_model, tokenizer):
    w = tokenizer.encode(" hello")
    Scripted(monkeypatch, tiny_model, w + [tokenizer.audio_start_id, tokenizer.im_end_id],
             [[3] * 8] * 4 + [[END_OF_AUDIO] * 8])
    conv = Conversation(tiny_model, tokenizer)
    conv.turn("user", "say hello")
    events = list(generate(conv, "sequential", max_new_tokens=100))
    assert _kinds(events) == "t" * len(w) + "t" + "a" * 5 + "t"  # <|im_end|> is yielded here
    assert [e.token for e in events if e.kind == "text" and e.token is not None][-1] == tokenizer.im_end_id
    assert events[-1].reason == "end_of_turn"


def test_max_new_tokens_and_context_limit(tiny_model, tokenizer):
    conv = Conversation(tiny_model, tokenizer)
    conv.turn("user", "hi")
    events = list(generate(conv, "interleaved", max_new_tokens=5))
    assert sum(e.kind != "end" for e in events if e.token is not None or e.frame is not None) == 5
    assert events[-1].reason == "max_new_tokens"
    small = Conversation(tiny_model, tokenizer, max_context=40)
    small.turn("user", "hello")
    events = list(generate(small, "interleaved", max_new_tokens=100))
    assert events[-1].reason == "context_limit"
    assert len(small.record.modality) <= 40
    with pytest.raises(InputError, match="context limit"):
        small.turn("user", tone(2.0), sample_rate=16000)


def test_sampled_generation_is_reproducible(tiny_model, tokenizer):
    def run(seed):
        conv = Conversation(tiny_model, tokenizer)
        conv.turn("user", tone(0.6), sample_rate=16000)
        evs = generate(conv, "interleaved", Sampling(1.0, top_k=50), Sampling(1.0, top_k=50), max_new_tokens=20, seed=seed)
        return [e.token if e.kind == "text" else tuple(e.frame.tolist()) for e in evs if e.kind != "end" and (e.token is not None or e.frame is not None)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_a_model_config_can_set_its_own_audio_sampling():
    from lfm2_audio.generation.sampling import CHAT_AUDIO, TTS_AUDIO, audio_sampling_defaults

    assert audio_sampling_defaults({}) == {"chat": CHAT_AUDIO, "tts": TTS_AUDIO}
    own = audio_sampling_defaults({"audio_sampling": {"chat": {"temperature": 0}, "tts": {"top_k": 8}}})
    assert own == {"chat": Sampling(0.0, 4), "tts": Sampling(0.8, 8)}  # unnamed fields keep the reference's
    # flags and request fields override in the same way: only the ones given
    assert CHAT_AUDIO.overridden() == CHAT_AUDIO and CHAT_AUDIO.overridden(None, 8, 0.9) == Sampling(1.0, 8, 0.9)
    assert CHAT_AUDIO.overridden(temperature=0.0) == Sampling(0.0, 4)
    for bad in ({"chat": 1}, {"speech": {}}, {"tts": {"temp": 1}}, [1], {"chat": {"top_k": 0}}):
        with pytest.raises(InputError, match="temperature|audio_sampling|top_k"):
            audio_sampling_defaults({"audio_sampling": bad})


def test_sampling_rules():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5]])
    assert sample(logits).tolist() == [1]  # greedy ties -> lowest index
    assert Sampling(temperature=1, top_k=1).greedy and Sampling(temperature=0).greedy
    g = torch.Generator().manual_seed(0)
    big = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    drawn = sample(big, Sampling(temperature=2, top_k=3), g)
    assert set(drawn.tolist()) == {0, 1, 2}
    freq = torch.bincount(drawn, minlength=6)[:3].float() / len(drawn)  # the k-best draw: softmax of the 3 best
    assert torch.allclose(freq, torch.tensor([5.0, 4.0, 3.0]).div(2).softmax(-1), atol=0.035)
    tied = torch.tensor([[3.0, 3.0, 3.0, 0.0]]).repeat(600, 1)  # a tie at the k-th value keeps all three
    assert set(sample(tied, Sampling(temperature=1, top_k=2), g).tolist()) == {0, 1, 2}
    mixed = torch.tensor([[3.0, 3.0, 3.0, 0.0], [4.0, 3.0, 2.0, 1.0]]).repeat(300, 1)  # ties in some rows only
    drawn = sample(mixed, Sampling(temperature=1, top_k=2), g).view(300, 2)
    assert set(drawn[:, 0].tolist()) == {0, 1, 2} and set(drawn[:, 1].tolist()) == {0, 1}
    one = sample(torch.tensor([1.0, 2.0, 3.0]), Sampling(temperature=1, top_k=2), g)  # one row, as generate() passes
    assert one.shape == () and one.item() in (1, 2)
    drawn = sample(big, Sampling(temperature=1, top_p=0.5), g)
    assert set(drawn.tolist()) <= {0, 1} and 0 in drawn.tolist()
    freq = (sample(torch.tensor([[0.0, math.log(3.0)]]).repeat(4000, 1), Sampling(1.0), g) == 1).float().mean()
    assert abs(freq.item() - 0.75) < 0.03
    for bad in (dict(temperature=float("nan")), dict(top_k=0), dict(top_p=1.5), dict(temperature="hot")):
        with pytest.raises(InputError):
            Sampling(**bad)
    assert not Sampling(temperature=1).greedy  # an int temperature is fine (the reference asserts float)


def test_bad_audio_and_turns(tiny_model, tokenizer, tmp_path):
    conv = Conversation(tiny_model, tokenizer)
    cases = [
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.zeros(16000, np.float32), 16000, "silent"),
        (np.full(16000, np.nan, np.float32), 16000, "NaN"),
        (tone(0.01), 16000, "short"),
        (tone(1.0), 0, "rate"),
    ]
    for wave, rate, msg in cases:
        with pytest.raises(InputError, match=f"(?i){msg}"):
            conv.add_audio(wave, sample_rate=rate)
    with pytest.raises(InputError, match="sample_rate is required"):
        conv.add_audio(tone(1.0))
    bad = tmp_path / "not_audio.wav"
    bad.write_text("hello")
    with pytest.raises(InputError, match="cannot read audio"):
        conv.add_audio(str(bad))
    with pytest.raises(InputError, match="role"):
        conv.new_turn("robot")
    with pytest.raises(InputError, match="token ids"):
        conv.add_tokens([5000])
    with pytest.raises(InputError, match="codes"):
        conv.add_audio_frames(torch.full((1, 8), 4000))
    with pytest.raises(InputError, match="mode"):
        next(generate(conv, "telepathic"))
    before = len(conv.record.modality)
    stereo44k = (np.stack([tone(1.0, 44100), tone(1.0, 44100, 330)], axis=1) * 32767).astype(np.int16)
    conv.add_audio(stereo44k, sample_rate=44100)  # mixed to mono and resampled
    assert len(conv.record.modality) - before == math.ceil(101 / 8)


def test_transcribe_caps_the_transcript_by_the_audio_length(monkeypatch, tiny_model, tokenizer):
    # a model stuck in a loop stops after 10 tokens per second of audio (+16), not at max_new_tokens
    from lfm2_audio.pipeline import LFM2Audio

    lfm = LFM2Audio(tiny_model, tokenizer)
    seen = []
    monkeypatch.setattr(LFM2Audio, "complete", lambda self, conv, *a, **kw: seen.append(kw) or
                        type("R", (), {"text": "x"})())
    lfm.transcribe(tone(1.0), sample_rate=16000)
    lfm.transcribe(tone(2.0, rate=48000), sample_rate=48000)
    lfm.transcribe(tone(100.0), sample_rate=16000)
    assert [kw["max_new_tokens"] for kw in seen] == [26, 36, 512]
    assert all(kw["sample_rate"] == 16000 for kw in seen)

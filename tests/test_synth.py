"""Synthetic training data (training/synth.py) and the evaluation's text scoring (evaluation.py).

Tests that speak need Debian's espeak-ng and are skipped without it; none needs the judge."""

import json
import random

import numpy as np
import pytest
import soundfile as sf

from lfm2_audio.evaluation import answer_correct, collapse_numbers, normalize_text, wer, word_errors
from lfm2_audio.generation.chat import SYSTEM_PROMPTS, VOICES
from lfm2_audio.training import synth

needs_espeak = pytest.mark.skipif(not synth.espeak_available(), reason="espeak-ng is not installed")

# A stand-in for WordNet (which needs Debian's wordnet-base): 400 distinct short sentences.
_ADJ = "red quiet old small bright heavy lazy clever".split()
_NOUN = "dog river teacher garden window letter farmer bridge candle".split()
_VERB = "watched found carried painted opened followed".split()
SENTENCES = sorted({f"The {a} {n} {v} the {m}." for a in _ADJ for n in _NOUN for v in _VERB for m in _NOUN[:3]})[:400]


# ---- splits -------------------------------------------------------------------------------------


def _sentences():
    try:
        return synth.wordnet_sentences()
    except FileNotFoundError:
        return SENTENCES


def test_held_out_sentences_and_questions_are_disjoint_from_training():
    sentences = _sentences()
    train, test = synth.pools("train", sentences), synth.pools("test", sentences)
    assert test.sentences and train.sentences and test.questions and train.questions
    assert not {synth.split_key(s) for s in train.sentences} & {synth.split_key(s) for s in test.sentences}
    train_q = {synth.split_key(q.question) for q in train.questions}
    assert not train_q & {synth.split_key(q.question) for q in test.questions}
    # every family can be asked in both splits
    assert set(train.families) == set(test.families)
    # the split is a property of the text alone, not of the seed or the list it came in
    assert all(synth.sentence_split(s) == "test" for s in test.sentences)
    assert synth.sentence_split("The Dog barked!") == synth.sentence_split("the dog barked")


def test_held_out_voices_are_disjoint_and_cover_every_accent():
    train, test = set(synth.voice_pool("train")), set(synth.voice_pool("test"))
    assert train and test and not train & test
    assert train | test == {(a, v) for a in synth.ACCENTS for v in synth.VARIANTS}
    for accent in synth.ACCENTS:
        assert any(a == accent for a, _ in train) and any(a == accent for a, _ in test)
    for v in synth.TTS_VOICES.values():  # the output voices are learned, so never held out
        assert (v.accent, v.variant) in train


def test_planned_conversations_respect_the_splits():
    sentences = SENTENCES
    pools = {s: synth.pools(s, sentences) for s in ("train", "test")}
    held_voices = synth.held_out_voices()
    for split in ("train", "test"):
        test_side = split == "test"
        for task in ("asr", "tts", "s2s"):
            for conv in synth.plan(split, task, 150, seed=3, p=pools[split]):
                assert conv.split == split and conv.task == task
                if task == "tts":
                    assert conv.meta["source"] != "wordnet" or synth.sentence_split(conv.meta["text"]) == split
                    continue
                voice = conv.meta["voice"]
                assert ((voice["accent"], voice["variant"]) in held_voices) == test_side
                if task == "asr" and conv.meta["source"] == "wordnet":
                    assert synth.sentence_split(conv.meta["text"]) == split
                if task == "asr" and conv.meta["source"] == "question":
                    assert synth.question_split(conv.meta["text"]) == split
                if task == "s2s":
                    for turn in conv.meta["turns"]:
                        assert synth.question_split(turn["question"]) == split


def test_plans_are_reproducible_and_prefix_stable():
    p = synth.pools("test", SENTENCES)
    a = [c.to_json() for c in synth.plan("test", "s2s", 40, seed=7, p=p)]
    b = [c.to_json() for c in synth.plan("test", "s2s", 40, seed=7, p=p)]
    c = [c.to_json() for c in synth.plan("test", "s2s", 10, seed=7, p=p)]
    d = [c.to_json() for c in synth.plan("test", "s2s", 40, seed=8, p=p)]
    assert a == b and a[:10] == c and a != d


def test_conversation_format():
    p = synth.pools("train", SENTENCES)
    asr, tts, s2s = (synth.plan("train", t, 8, seed=0, p=p) for t in ("asr", "tts", "s2s"))
    r = asr[0].to_json()
    assert r["messages"][0] == {"role": "system", "content": SYSTEM_PROMPTS["asr"]}
    assert r["messages"][1]["content"][0]["path"].startswith("audio/16k/")
    assert r["messages"][2]["content"][0] == {"type": "text", "text": r["meta"]["text"]}
    for i, conv in enumerate(tts):
        r = conv.to_json()
        assert r["meta"]["voice_name"] == VOICES[i % 4]
        assert r["messages"][0]["content"] == SYSTEM_PROMPTS[f"tts-{VOICES[i % 4]}"]
        assert r["messages"][2]["content"][0]["path"].startswith("audio/24k/")
    for conv in s2s:
        r = conv.to_json()
        assert r["messages"][0]["content"] == SYSTEM_PROMPTS["chat"]
        roles = [m["role"] for m in r["messages"][1:]]
        assert roles == ["user", "assistant"] * len(r["meta"]["turns"])
        for m, turn in zip(r["messages"][2::2], r["meta"]["turns"]):
            seg = m["content"][0]
            assert seg["type"] == "interleaved" and seg["text"] == turn["answer"]
        for m, turn in zip(r["messages"][1::2], r["meta"]["turns"]):  # the spoken question's words
            assert m["content"][0]["transcript"] == turn["question"]


# ---- the question family -------------------------------------------------------------------------


def _numbers(text: str) -> list[int]:
    return [int(w) for w in collapse_numbers(normalize_text(text).split()) if w.isdigit()]


def test_arithmetic_answers_are_right():
    family = synth.question_family()
    assert len(family) > 5000 and len({q.question for q in family}) == len(family)
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b,
           "divided": lambda a, b: a // b}
    checked = 0
    for qa in family:
        key = _numbers(qa.key)
        if qa.family in ops:
            a, b = _numbers(qa.answer)[:2]
            assert key == [ops[qa.family](a, b)] == [qa.value], qa
            assert sorted(_numbers(qa.question)) == sorted([a, b]), qa
            if qa.family == "divided":
                assert a == b * qa.value
        elif qa.family == "double":
            assert key == [2 * _numbers(qa.question)[0]] == [2 * _numbers(qa.answer)[0]], qa
        elif qa.family == "half":
            n = _numbers(qa.question)[0]
            assert key == [n // 2] and n % 2 == 0 and _numbers(qa.answer)[0] == n, qa
        elif qa.family == "compare":
            a, b = _numbers(qa.question)
            assert key == [max(a, b) if "small" not in qa.question and "less" not in qa.question else min(a, b)], qa
        elif qa.family == "successor":
            # ("one more than two": the question's first number may be the "one")
            n = _numbers(qa.answer)[0]
            assert n in _numbers(qa.question) and key == [n + 1 if "after" in qa.answer else n - 1], qa
        else:
            continue
        assert answer_correct(qa.answer, qa.key, qa.question), qa
        checked += 1
    assert checked > 5000


def test_every_answer_states_its_key_and_follow_ups_add_up():
    numeric = {"plus", "minus", "times", "divided", "double", "half", "compare", "successor"}
    for qa in synth.question_family():
        if qa.family not in numeric:  # (the numeric ones are checked above)
            assert answer_correct(qa.answer, qa.key, qa.question), qa
    rng = random.Random(0)
    prev = synth.QA("What is seven plus five?", "Seven plus five is twelve.", "twelve", "plus", 12)
    for _ in range(50):
        f = synth.follow_up(prev, rng, "train")
        assert f is not None and synth.question_split(f.question) == "train"
        a, k = _numbers(f.answer)[:2]
        assert a == 12 and _numbers(f.key) == [f.value]
        assert f.value in (12 + k, 12 - k, 12 * k)
        assert answer_correct(f.answer, f.key, f.question)
    day = synth.QA("What day comes after Monday?", "The day after Monday is Tuesday.", "Tuesday", "day", "Tuesday")
    f = synth.follow_up(day, rng, "train") or synth.follow_up(day, rng, "test")
    assert f.key == "Wednesday"
    assert synth.follow_up(synth.QA("What colour is snow?", "Snow is white.", "white", "colour"), rng, "train") is None


def test_number_words():
    assert [synth.number_words(n) for n in (0, 7, 13, 40, 24, 100, 105, 2024)] == [
        "zero", "seven", "thirteen", "forty", "twenty-four", "one hundred", "one hundred and five",
        "two thousand and twenty-four"]
    assert [synth.ordinal_words(n) for n in (1, 2, 3, 12, 20, 21)] == [
        "first", "second", "third", "twelfth", "twentieth", "twenty-first"]
    for n in list(range(0, 1200)) + [10**6 + 7, 123456789]:
        assert collapse_numbers(normalize_text(synth.number_words(n)).split()) == [str(n)]


# ---- scoring text ---------------------------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("Seven plus five is 12.") == "seven plus five is twelve"
    assert normalize_text("Twenty-four, please!") == "twenty four please"
    assert normalize_text("It's the 1st of May.") == "it's the first of may"
    assert normalize_text("1,000 grey tyres") == "one thousand gray tires"
    assert normalize_text("What COLOUR is the sky?") == normalize_text("what color is the sky")
    assert normalize_text("the dogs' 'bones'") == "the dogs bones"
    assert normalize_text("50%") == "fifty percent"
    assert normalize_text("3.5") == "three point five"
    assert normalize_text("  ") == ""


def test_word_error_rate():
    assert word_errors("The cat sat.", "the cat sat") == (0, 3)
    assert word_errors("the cat sat", "the cat sat down") == (1, 3)
    assert word_errors("the cat sat", "a cat") == (2, 3)
    assert word_errors("seven plus five is twelve", "7 plus 5 is 12") == (0, 5)
    assert wer(["the cat sat", "a dog"], ["the cat sat down", ""]) == pytest.approx(3 / 5)
    assert wer(["Hello, world."], ["hello world"]) == 0.0


def test_answer_matching():
    q = "What is seven plus five?"
    assert answer_correct("Seven plus five is 12.", "twelve", q)
    assert answer_correct("It's twelve", "twelve", q)
    assert not answer_correct("Seven plus five is thirteen.", "twelve", q)
    # a number key matches whole numbers only
    assert not answer_correct("It is twenty-one.", "twenty", "What is ten plus ten?")
    assert not answer_correct("One hundred and twenty.", "twenty", "What is ten plus ten?")
    # a key that is also in the question must be stated as the answer, not just echoed
    assert not answer_correct("Five plus zero is six.", "five", "What is five plus zero?")
    assert answer_correct("Five plus zero is five.", "five", "What is five plus zero?")
    assert answer_correct("The plural of sheep is sheep.", "sheep", "What is the plural of sheep?")
    assert answer_correct("Sheep is the plural of sheep.", "sheep", "What is the plural of sheep?")
    assert answer_correct("Thirty-seven is bigger.", "thirty-seven", "Which is bigger, thirty-seven or ten?")
    assert not answer_correct("Thirty-seven or ten.", "thirty-seven", "Which is bigger, thirty-seven or ten?")
    assert not answer_correct("Ten is bigger.", "thirty-seven", "Which is bigger, thirty-seven or ten?")
    assert answer_correct("The bigger number is 37.", "thirty-seven", "Which is bigger, thirty-seven or ten?")
    assert answer_correct("The capital of France is Paris.", "Paris", "What is the capital of France?")


def test_s2s_accuracy_by_where_the_key_falls():
    from lfm2_audio.evaluation import _by_key_place, key_after_first_run

    class Words:  # one token per word
        encode = staticmethod(str.split)

    assert key_after_first_run("The capital of Norway is Oslo.", "Oslo", Words, 6) is False
    assert key_after_first_run("A baby cow is called a calf.", "calf", Words, 6) is True
    assert key_after_first_run("Four plus four is eight.", "nine", Words, 6) is None
    turns = [{"key_after_audio": k, "text_correct": c} for k, c in
             ((False, True), (False, True), (False, False), (True, False), (True, True), (None, True))]
    assert _by_key_place(turns) == {"after_audio": {"n": 2, "text_accuracy": 0.5},
                                    "first_text_run": {"n": 3, "text_accuracy": 2 / 3}}


def test_s2s_evaluation_can_give_the_model_the_reference_speech(tmp_path):
    # stand-ins: a codec whose codes are the clip's length, a model that answers right only
    # when it is handed speech
    import types

    import torch

    from lfm2_audio.evaluation import eval_s2s

    rate = 24000
    sf.write(tmp_path / "q.wav", np.zeros(8000, np.float32), 16000)
    sf.write(tmp_path / "a.wav", np.zeros(rate, np.float32), rate)
    rec = {"id": "test-s2s-000000",
           "meta": {"turns": [{"question": "Name the capital of Norway.", "answer": "The capital of Norway is Oslo.",
                               "key": "Oslo", "family": "capital"}]},
           "messages": [{"role": "user", "content": [{"type": "audio", "path": "q.wav"}]},
                        {"role": "assistant", "content": [{"type": "interleaved", "path": "a.wav"}]}]}

    class Codec:
        can_encode, sample_rate = True, rate

        def encode(self, wave):
            return torch.full((1, 8, wave.shape[-1] // 1920), 3)

    class Model:
        codec, tokenizer, given = Codec(), types.SimpleNamespace(encode=str.split), []
        model = types.SimpleNamespace(cfg=types.SimpleNamespace(interleaved_n_text=6))

        def chat(self):
            return None

        def respond(self, conv, wave, force_frames=None, **kw):
            self.given.append(force_frames)
            yield types.SimpleNamespace(kind="text", text="Oslo." if force_frames is not None else "Bergen.")

    plain = eval_s2s(Model(), [rec], tmp_path, None, log=lambda s: None)
    given = eval_s2s(Model(), [rec], tmp_path, None, log=lambda s: None, reference_speech=True)
    assert (plain["text_accuracy"], given["text_accuracy"]) == (0.0, 1.0) and given["reference_speech"]
    assert Model.given[0] is None and Model.given[1].shape == (12, 8)  # [frames, codebooks]


# ---- speech ---------------------------------------------------------------------------------------


def test_pitch_tracker_on_tones():
    rate = 16000
    t = np.arange(rate) / rate
    for f0 in (85, 120, 210, 300):
        x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 12))
        assert synth.median_pitch(x, rate) == pytest.approx(f0, rel=0.01)
    assert np.isnan(synth.median_pitch(np.zeros(rate), rate))


def test_parse_espeak_stream_header():
    # espeak-ng's streamed WAV has placeholder sizes; the parser must read to the end anyway
    samples = (np.arange(100, dtype=np.int16) * 50).tobytes()
    fmt = (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (22050).to_bytes(4, "little") \
        + (44100).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    data = b"RIFF" + b"\xff\xff\xff\x7f" + b"WAVE" + b"fmt " + (16).to_bytes(4, "little") + fmt \
        + b"data" + b"\x00\xf0\xff\x7f" + samples
    x = synth._parse_wav(data)
    assert x.shape == (100,) and x[1] == pytest.approx(50 / 32768)


@needs_espeak
def test_tts_voices_are_distinct_and_male_female_pitch_differs():
    settings = {(v.accent, v.variant, v.pitch) for v in synth.TTS_VOICES.values()}
    assert len(settings) == 4
    lines = ["The weather was fine all week.", "She opened the window slowly.", "We walked along the river."]
    f0 = {}
    for name, voice in synth.TTS_VOICES.items():
        waves = [synth.render(synth.Utterance.of(s, voice, synth.INPUT_RATE)) for s in lines]
        f0[name] = np.median(np.concatenate([synth.pitch_track(w, synth.INPUT_RATE) for w in waves]))
    for accent in ("us", "uk"):
        assert f0[f"{accent}-female"] - f0[f"{accent}-male"] > 40, f0
    # variants really apply (espeak-ng ignores them on "en-gb"; we name the voice file instead)
    a = synth.render(synth.Utterance("Hello there.", "en-gb", "m1", 165, 50, 16000))
    b = synth.render(synth.Utterance("Hello there.", "en-gb", "f2", 165, 50, 16000))
    assert a.shape != b.shape or not np.array_equal(a, b)


@needs_espeak
def test_generation_is_deterministic(tmp_path):
    kw = dict(seed=5, n_asr=3, n_tts=4, n_s2s=3, n_test=2, workers=2, shard_size=5, sentences=SENTENCES,
              progress=False)
    m1 = synth.generate_dataset(tmp_path / "a", **kw)
    m2 = synth.generate_dataset(tmp_path / "b", **{**kw, "workers": 1})
    assert m1["clips"] == m2["clips"] > 10 and m1["hours_of_speech"] == m2["hours_of_speech"]
    names = sorted(p.name for p in (tmp_path / "a").glob("*.jsonl"))
    assert names == ["test-asr.jsonl", "test-s2s.jsonl", "test-tts.jsonl", "train-00000.jsonl", "train-00001.jsonl"]
    for name in names:
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    clips = sorted((tmp_path / "a" / "audio").rglob("*.flac"))
    assert len(clips) == m1["clips"]
    for path in clips:
        x, rate = sf.read(path, dtype="int16")
        y, _ = sf.read(tmp_path / "b" / path.relative_to(tmp_path / "a"), dtype="int16")
        assert np.array_equal(x, y) and rate == (16000 if "/16k/" in str(path) else 24000)
    # every referenced clip exists, with its duration recorded
    for name in names:
        for line in (tmp_path / "a" / name).read_text().splitlines():
            rec = json.loads(line)
            for m in rec["messages"]:
                for seg in m["content"] if isinstance(m["content"], list) else ():
                    if "path" in seg:
                        assert (tmp_path / "a" / seg["path"]).exists() and seg["seconds"] > 0.3
    # a different seed gives a different data set
    m3 = synth.generate_dataset(tmp_path / "c", **{**kw, "seed": 6})
    assert (tmp_path / "c" / "test-asr.jsonl").read_text() != (tmp_path / "a" / "test-asr.jsonl").read_text()
    assert m3["sizes"] == m1["sizes"]


@needs_espeak
def test_records_load_as_training_conversations(tmp_path):
    data = pytest.importorskip("lfm2_audio.training.data")
    synth.generate_dataset(tmp_path, seed=0, n_s2s=2, n_test=1, sentences=SENTENCES, progress=False)
    convs = list(data.read_conversations(tmp_path / "train-00000.jsonl"))
    assert len(convs) == 2
    for conv in convs:
        assert conv[0].role == "system"
        seg = conv[2].content[0]
        assert isinstance(seg, data.Interleaved) and sf.info(seg.audio.source).samplerate == 24000


def test_tts_evaluation_scores_the_model_espeak_and_the_codec_round_trip(tmp_path):
    # stand-ins: a "model" that always speaks a tone, a codec whose round trip halves the audio,
    # and a judge that hears the sentence only in espeak's full-length clip
    import torch

    from lfm2_audio.evaluation import eval_tts

    rate, text = 24000, "The red dog watched the river."
    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a" / "x.wav", np.sin(np.arange(rate) / 7).astype(np.float32) * 0.3, rate)
    rec = {"id": "test-tts-000000", "meta": {"text": text, "voice_name": "us-male"},
           "messages": [{"role": "assistant", "content": [{"type": "audio", "path": "a/x.wav"}]}]}

    class Codec:
        can_encode, sample_rate = True, rate

        def encode(self, x):
            return x[:, : x.shape[1] // 2]

        def decode(self, codes):
            return codes

    class Reply:
        frames, reason, sample_rate = torch.zeros(12, 8), "end_of_turn", rate
        audio = np.zeros(rate // 4, np.float32)

    class Model:
        codec, asked = Codec(), []

        def speak(self, text, **kw):
            self.asked.append(kw.get("audio_sampling"))
            return Reply()

    class Judge:
        def transcribe(self, wave, r):
            return text if len(wave) > 0.9 * r else "the dog"

    out = eval_tts(Model(), [rec], tmp_path, Judge(), log=lambda s: None)
    assert out["judge_wer_espeak"] == 0.0
    assert out["judge_wer"] == out["judge_wer_codec"] == pytest.approx(4 / 6)
    assert out["items"][0]["judge_on_codec"] == "the dog"
    from lfm2_audio.generation.sampling import Sampling  # `lfm2-audio eval --audio-temperature 0.3 --audio-top-k 8`

    eval_tts(Model(), [rec], tmp_path, None, log=lambda s: None, sampling=Sampling(0.3, 8))
    assert Model.asked == [None, Sampling(0.3, 8)]


def test_asr_evaluation_can_put_silence_before_each_clip(tmp_path):
    from lfm2_audio.evaluation import eval_asr

    rate = 16000
    clip = (0.2 * np.sin(np.arange(rate // 2) / 5)).astype(np.float32)
    sf.write(tmp_path / "q.wav", clip, rate, subtype="FLOAT")
    rec = {"id": "test-asr-000000", "meta": {"text": "one two"},
           "messages": [{"role": "user", "content": [{"type": "audio", "path": "q.wav"}]}]}
    heard = []

    class Model:
        from lfm2_audio.generation.beam import AsrDecoding

        asr_decoding = AsrDecoding()

        def transcribe(self, wave, sample_rate, max_new_tokens, beam, ctc_weight):
            heard.append(wave)
            return "one"

    out = eval_asr(Model(), [rec], tmp_path, log=lambda s: None, lead_silence=1.5)
    assert out["wer"] == 0.5 and out["audio_seconds"] == pytest.approx(2.0)
    assert not heard[0][:24000].any() and np.array_equal(heard[0][24000:], clip)

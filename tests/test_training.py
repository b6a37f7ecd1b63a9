import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm2_audio.config import END_OF_AUDIO, LFM2AudioConfig
from lfm2_audio.errors import InputError
from lfm2_audio.model.lfm2_audio import LFM2AudioModel
from lfm2_audio.processor import Tokenizer
from lfm2_audio.training.data import (
    Audio,
    Interleaved,
    Message,
    SampleStore,
    SilencePadding,
    collate,
    interleave,
    map_conversation,
    pack_rows,
    pad_with_silence,
    precompute,
)
from lfm2_audio.training.loss import (
    codebook_weights,
    dead_parameter_names,
    forward_sums,
    freeze_batchnorm,
    loss_fn,
    noisy_codes,
    own_codes,
    packed_backbone,
    segment_groups,
)
from lfm2_audio.training.trainer import TrainConfig, lr_at, train

ASSETS = Path(__file__).parent / "assets"
T, A = 1, 3  # modality flags used in layouts below
TINY = {
    "encoder": {"n_layers": 1, "d_model": 32, "n_heads": 2, "subsampling_conv_channels": 8},
    "lfm": {"vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "block_multiple_of": 32,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "depthformer": {"layers": 1, "dim": 64, "tie": False},
}


class FakeCodec:
    """The codec interface's encode/sample_rate, returning codes that depend on the audio."""

    sample_rate = 24000
    can_encode = True

    def encode(self, wave):
        frames = -(-wave.shape[-1] // 1920)
        g = torch.Generator().manual_seed(int(wave.abs().sum() * 1000) % 2**31)
        return torch.randint(0, 2048, (wave.shape[0], 8, frames), generator=g)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models are fastest on one thread; on a busy machine extra OpenMP threads mostly wait.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(ASSETS / "tokenizer.json")


@pytest.fixture(scope="module")
def cfg():
    return LFM2AudioConfig.from_dict(json.loads(json.dumps(TINY)))


def _wave(n, seed):
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def _conversations(n, seed=0):
    """A mix of ASR, TTS, chat (interleaved) and text-only conversations."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 4
        words = " ".join(rng.choice(["hello", "world", "speech", "model", "audio", "train"], size=rng.integers(2, 7)))
        if kind == 0:
            conv = [Message("system", ["Perform ASR."]), Message("user", [Audio(_wave(int(rng.integers(3000, 12000)), i), 16000)]),
                    Message("assistant", [words])]
        elif kind == 1:
            conv = [Message("system", ["Perform TTS."]), Message("user", [words]),
                    Message("assistant", [Audio(_wave(int(rng.integers(2000, 20000)), i), 24000)])]
        elif kind == 2:
            conv = [Message("system", ["Respond with interleaved text and audio."]),
                    Message("user", [Audio(_wave(8000, i), 16000)]),
                    Message("assistant", [Interleaved(words, Audio(_wave(int(rng.integers(10000, 40000)), i), 24000))])]
        else:
            conv = [Message("user", [words]), Message("assistant", [words[::-1]])]
        out.append(conv)
    return out


# ---- mapper ----------------------------------------------------------------------------------


def test_mapper_text_layout_and_piecewise_tokens(tok, cfg):
    conv = [Message("system", ["Perform ASR."]), Message("user", ["Hi there"]), Message("assistant", ["Hello."])]
    s = map_conversation(conv, tok, cfg)
    pieces = [("<|startoftext|>", 0), ("<|im_start|>system\n", 0), ("Perform ASR.", 0), ("<|im_end|>\n", 0),
              ("<|im_start|>user\n", 0), ("Hi there", 0), ("<|im_end|>\n", 0),
              ("<|im_start|>assistant\n", 0), ("Hello.", 1), ("<|im_end|>\n", 1)]
    ids, sup = [], []
    for text, supervised in pieces:  # one encode call per piece, like the inference prompt
        piece = tok.encode(text)
        ids += piece
        sup += [bool(supervised)] * len(piece)
    assert s.text.tolist() == ids
    assert s.modality.tolist() == [T] * len(ids)
    assert s.supervised.tolist() == sup
    assert ids[0] == tok.bos_id and ids[-2:] == tok.encode("<|im_end|>\n")


@pytest.mark.parametrize("mode, positions", [("inference", 14), ("valid", 13)])
def test_mapper_audio_in_and_audio_out(tok, cfg, mode, positions):
    # 16640 samples: valid = 104 mel frames -> 13 positions; inference feeds 105 -> 14
    out_wave = _wave(5 * 1920 - 100, 2)
    conv = [Message("user", [Audio(_wave(16640, 1), 16000)]), Message("assistant", [Audio(out_wave, 24000)])]
    s = map_conversation(conv, tok, cfg, FakeCodec(), audio_in_frames=mode)
    head = tok.encode("<|startoftext|>") + tok.encode("<|im_start|>user\n")
    mid = tok.encode("<|im_end|>\n") + tok.encode("<|im_start|>assistant\n")
    tail = tok.encode("<|im_end|>\n")
    assert len(s.audio_in) == 1 and s.audio_in[0].shape == (128, 105 if mode == "inference" else 104)
    assert s.audio_in[0].dtype == torch.float32
    expect_mod = [T] * len(head) + [2] * positions + [T] * len(mid) + [T] + [A] * 6 + [T] * len(tail)
    expect_sup = [False] * (len(head) + positions + len(mid)) + [True] * (1 + 6 + len(tail))
    assert s.modality.tolist() == expect_mod
    assert s.supervised.tolist() == expect_sup
    assert s.text.tolist() == head + mid + [tok.audio_start_id] + tail
    codes = FakeCodec().encode(torch.from_numpy(out_wave)[None])[0].T
    assert s.audio_out.shape == (6, 8) and s.audio_out.dtype == torch.int64
    assert torch.equal(s.audio_out[:5], codes) and s.audio_out[5].tolist() == [END_OF_AUDIO] * 8


def test_mapper_interleaved_chunks(tok, cfg):
    text = "Hello there, this is fine."
    ids = tok.encode(text + "<|text_end|>")  # ONE encode call with the text_end token
    assert ids[-1] == tok.text_end_id
    n = len(ids)
    assert n == 14
    wave = _wave(29 * 1920, 3)  # 29 frames + the end-of-audio frame
    conv = [Message("user", ["hi"]), Message("assistant", [Interleaved(text, Audio(wave, 24000))])]
    s = map_conversation(conv, tok, cfg, FakeCodec())
    head = tok.encode("<|startoftext|>") + tok.encode("<|im_start|>user\n") + tok.encode("hi") + \
        tok.encode("<|im_end|>\n") + tok.encode("<|im_start|>assistant\n")
    # expected chunking, written out: [6 text][12 audio] ... until both run out
    layout, t, a = [], 0, 0
    while t < n or a < 30:
        layout += [T] * min(6, n - t) + [A] * min(12, 30 - a)
        t, a = t + min(6, n - t), a + min(12, 30 - a)
    tail = tok.encode("<|im_end|>\n")
    assert s.modality.tolist() == [T] * len(head) + layout + [T] * len(tail)
    assert s.supervised.tolist() == [False] * len(head) + [True] * (len(layout) + len(tail))
    assert s.text.tolist() == head + ids + tail  # no <|audio_start|> in interleaved segments
    assert s.audio_out.shape == (30, 8) and s.audio_out[-1].tolist() == [END_OF_AUDIO] * 8
    assert (s.audio_out[:-1] < 2048).all()
    runs = [(T, 6), (A, 12), (T, 6), (A, 12), (T, 2), (A, 6)]
    assert interleave(14, 30, 6, 12) == runs
    assert layout == [m for m, k in runs for _ in range(k)]


def test_interleave_runs():
    assert interleave(20, 5, 6, 12) == [(T, 6), (A, 5), (T, 14)]  # audio runs out: text goes on
    assert interleave(3, 40, 6, 12) == [(T, 3), (A, 40)]
    assert interleave(12, 24, 6, 12) == [(T, 6), (A, 12), (T, 6), (A, 12)]


def test_mapper_rejects_bad_input(tok, cfg):
    with pytest.raises(InputError):
        map_conversation([Message("robot", ["x"])], tok, cfg)
    with pytest.raises(InputError):
        map_conversation([Message("user", [Interleaved("x", Audio(_wave(4000, 0), 24000))])], tok, cfg, FakeCodec())
    with pytest.raises(InputError):  # assistant audio needs a codec
        map_conversation([Message("assistant", [Audio(_wave(4000, 0), 24000)])], tok, cfg)
    with pytest.raises(InputError):
        map_conversation([], tok, cfg)


def test_store_roundtrip_and_packing(tok, cfg, tmp_path):
    convs = _conversations(8)
    stats = precompute(convs, tmp_path / "set", tok, cfg, FakeCodec(), shard_size=3)
    assert stats["written"] == 8
    store = SampleStore(tmp_path / "set")
    assert len(store) == 8 and len(list((tmp_path / "set").glob("shard-*.safetensors"))) == 3
    for i, conv in enumerate(convs):
        ref, got = map_conversation(conv, tok, cfg, FakeCodec()), store[i]
        assert store.lengths[i] == len(ref)
        for name in ("text", "audio_out", "modality", "supervised"):
            assert torch.equal(getattr(ref, name), getattr(got, name)), name
        assert len(ref.audio_in) == len(got.audio_in)
        assert all(torch.equal(x, y) for x, y in zip(ref.audio_in, got.audio_in))
    rows = pack_rows(store.lengths, range(len(store)), 256)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(store.lengths[i] for i in r) <= 256 for r in rows)


def test_silence_padding_is_random_per_clip_and_repeatable(tok, cfg, tmp_path):
    pad = SilencePadding(probability=0.5, max_lead=1.0, max_trail=0.5)
    clips = [_wave(8000, i) for i in range(40)]
    padded = [pad_with_silence(c, 16000, pad) for c in clips]
    grown = [p.size - c.size for c, p in zip(clips, padded)]
    assert 10 <= sum(g > 0 for g in grown) <= 30  # about half the clips
    assert max(grown) <= 1.5 * 16000
    for c, p in zip(clips, padded):  # the same clip always gets the same padding
        assert np.array_equal(p, pad_with_silence(c, 16000, pad))
    # the speech itself is kept: at the lead's offset (digital silence) or under a faint floor
    c, p = next((c, p) for c, p in zip(clips, padded) if p.size > c.size)
    lead = next(i for i in range(p.size - c.size + 1) if np.abs(p[i : i + c.size] - c).max() < 0.01)
    assert np.sqrt(np.mean(p[:lead] ** 2)) < 0.0062  # at most -45 dBFS of noise
    assert np.array_equal(pad_with_silence(c, 16000, SilencePadding(probability=0.0)), c)
    with pytest.raises(InputError):
        SilencePadding(probability=1.5)

    # precompute pads the user clips only, and records how
    asr = [Message("system", ["Perform ASR."]), Message("user", [Audio(clips[0], 16000)]), Message("assistant", ["hi"])]
    always = SilencePadding(probability=1.0, max_lead=1.0, max_trail=1.0, seed=3)
    precompute([asr], tmp_path / "plain", tok, cfg)
    precompute([asr], tmp_path / "padded", tok, cfg, silence=always)
    plain, padded_set = SampleStore(tmp_path / "plain")[0], SampleStore(tmp_path / "padded")[0]
    assert padded_set.audio_in[0].shape[1] > plain.audio_in[0].shape[1]
    assert padded_set.text.tolist() == plain.text.tolist()
    index = json.loads((tmp_path / "padded" / "index.json").read_text())
    assert index["silence_padding"]["seed"] == 3


# ---- loss ------------------------------------------------------------------------------------


def test_codebook_weights(cfg):
    w = codebook_weights(cfg)
    assert [round(x, 3) for x in w.tolist()] == [100, 51.795, 26.827, 13.895, 7.197, 3.728, 1.931, 1.0]
    lin = LFM2AudioConfig.from_dict({**json.loads(json.dumps(TINY)), "codebook_weight": "linear",
                                     "semantic_codebook_factor": 5})
    assert codebook_weights(lin).tolist() == [5, 1, 1, 1, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    m = LFM2AudioModel(cfg).float()
    m.train()
    freeze_batchnorm(m)
    return m


def test_packed_row_equals_separate_samples(tok, cfg, model):
    samples = [map_conversation(c, tok, cfg, FakeCodec()) for c in _conversations(4, seed=5)]
    rows = [[samples[0], samples[1], samples[2]], [samples[3]]]
    packed = collate(rows)
    assert packed.packed
    assert len(segment_groups(packed.segment_lengths, "cpu")) >= 2  # several attention groups exercised
    # hidden states: the block-diagonal run equals each sample run alone
    with torch.no_grad():
        enc = model.encode_audio(packed.audio_in)
        x = model.embed_inputs(packed.text, enc, packed.audio_out, packed.modality.reshape(-1)).view(2, -1, 64)
        h = packed_backbone(model.lfm, x, packed.position, packed.segment_lengths)
        start = 0
        for s in rows[0]:
            one = collate([[s]])
            e1 = model.encode_audio(one.audio_in)
            x1 = model.embed_inputs(one.text, e1, one.audio_out, one.modality.reshape(-1))[None]
            torch.testing.assert_close(h[0, start : start + len(s)], model.lfm(x1)[0], atol=1e-5, rtol=1e-5)
            start += len(s)
    # loss: the same sums and the same normalised loss
    sep = [forward_sums(model, collate([[s]])) for s in samples]
    both = forward_sums(model, packed)
    assert both.n_text == sum(s.n_text for s in sep) and both.n_frames == sum(s.n_frames for s in sep)
    assert math.isclose(both.text_sum, sum(s.text_sum for s in sep), rel_tol=1e-5)
    assert math.isclose(both.audio_sum, sum(s.audio_sum for s in sep), rel_tol=1e-5)
    loss, parts = loss_fn(model, packed)
    ref = sum(float(s.numerator.detach()) for s in sep) / sum(s.denominator for s in sep)
    assert abs(float(loss.detach()) - ref) < 1e-5 * max(1.0, ref)
    assert parts["text_tokens"] == both.n_text and parts["audio_frames"] == both.n_frames


def test_code_noise_changes_what_the_model_reads_not_its_targets(tok, cfg, model):
    codes = torch.randint(0, 2048, (10_000, 8))
    codes[::10] = 2048  # end-of-audio frames stay
    noisy = noisy_codes(codes, 0.3)
    changed = (noisy != codes).float().mean().item()
    assert abs(changed - 0.3 * 0.9) < 0.01 and bool((noisy[::10] == 2048).all()) and int(noisy.max()) == 2048
    batch = collate([[map_conversation(c, tok, cfg, FakeCodec()) for c in _conversations(3, seed=7)]])
    before = batch.audio_out.clone()
    clean, noised = forward_sums(model, batch), forward_sums(model, batch, code_noise=0.5)
    assert torch.equal(batch.audio_out, before)
    assert (noised.n_text, noised.n_frames) == (clean.n_text, clean.n_frames)
    assert noised.audio_sum != clean.audio_sum and noised.text_sum != clean.text_sum  # text follows audio runs
    with pytest.raises(InputError, match="code_noise"):
        TrainConfig.from_dict({"output_dir": "o", "train_data": "d", "model_config": "c", "code_noise": 1.0})


def test_self_feed_reads_the_models_own_frames(tok, cfg, model):
    from lfm2_audio.generation.sampling import GREEDY
    from lfm2_audio.training.loss import backbone_states

    batch = collate([[map_conversation(c, tok, cfg, FakeCodec()) for c in _conversations(3, seed=7)]])
    with torch.no_grad():
        _, h = backbone_states(model, batch)
        assert torch.equal(own_codes(model, batch, h, 0.0, GREEDY), batch.audio_out)
        own = own_codes(model, batch, h, 1.0, GREEDY)
        # each output frame is the greedy frame from the state one position before it
        out = (batch.modality == A).nonzero().tolist()
        expect = torch.stack([model.sample_frame(h[b, t - 1][None])[0] for b, t in out])
    eoa = (batch.audio_out[:, 0] == END_OF_AUDIO) | (expect[:, 0] == END_OF_AUDIO)
    assert torch.equal(own[eoa], batch.audio_out[eoa]) and torch.equal(own[~eoa], expect[~eoa])
    assert int((~eoa).sum()) > 10
    before = batch.audio_out.clone()
    clean, fed = forward_sums(model, batch), forward_sums(model, batch, self_feed=0.5)
    assert torch.equal(batch.audio_out, before)
    assert (fed.n_text, fed.n_frames) == (clean.n_text, clean.n_frames) and fed.audio_sum != clean.audio_sum
    with pytest.raises(InputError, match="self_feed"):
        TrainConfig.from_dict({"output_dir": "o", "train_data": "d", "model_config": "c", "self_feed": -0.1})


def test_every_live_parameter_gets_a_gradient(tok, cfg, model):
    samples = [map_conversation(c, tok, cfg, FakeCodec()) for c in _conversations(3, seed=7)]
    model.zero_grad(set_to_none=True)
    loss, _ = loss_fn(model, collate([samples]))
    loss.backward()
    dead = set(dead_parameter_names(model))
    assert dead == {"audio_embedding.embedding_norm.weight", "audio_embedding.to_logits.weight",
                    "depth_embeddings.7.embedding.weight"}
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in dead), name
    # a text-only batch with touch_all still reaches every live parameter (what DDP needs)
    model.zero_grad(set_to_none=True)
    text_only = map_conversation(_conversations(4)[3], tok, cfg)
    forward_sums(model, collate([[text_only]]), touch_all=True).numerator.backward()
    assert {n for n, p in model.named_parameters() if p.grad is None} == dead
    model.zero_grad(set_to_none=True)


# ---- trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tok, cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "config.json").write_text(json.dumps(TINY))
    (root / "assets").mkdir()
    (root / "assets" / "tokenizer.json").write_bytes((ASSETS / "tokenizer.json").read_bytes())
    precompute(_conversations(12, seed=1), root / "train", tok, cfg, FakeCodec())
    precompute(_conversations(4, seed=2), root / "val", tok, cfg, FakeCodec())
    return root


def _train_cfg(dataset, out, **kw):
    base = dict(output_dir=str(out), train_data=str(dataset / "train"), model_config=str(dataset / "config.json"),
                copy_assets_from=str(dataset / "assets"), context_length=512, batch_rows=2, lr=3e-3,
                warmup_steps=2, max_steps=6, precision="fp32", log_every=1, eval_every=1000, save_every=1000,
                threads=1, device="cpu")
    base.update(kw)
    return TrainConfig.from_dict(base)


def _log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_ctc_targets_are_asr_transcripts_and_reach_the_encoder(tok, cfg, model):
    from lfm2_audio.training.loss import ctc_sum

    convs = _conversations(4, seed=3)  # ASR, TTS, interleaved, text-only
    convs[0][1] = Message("user", [Audio(_wave(32000, 0), 16000)])  # 2 s: 25 frames, room for the words
    samples = [map_conversation(c, tok, cfg, FakeCodec()) for c in convs]
    batch = collate([samples[:2], samples[2:]])
    assert len(batch.transcripts) == len(batch.audio_in) == 2  # the ASR and the interleaved clip
    words = convs[0][2].content[0]
    assert batch.transcripts[0].tolist() == tok.encode(words) and batch.transcripts[1] is None
    model.zero_grad(set_to_none=True)
    enc = model.encode_audio(batch.audio_in)
    loss = ctc_sum(model, enc, batch)
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert model.conformer.pre_encode.conv[0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    # with weight 0 the numerator is the spec's loss, bit for bit
    a = forward_sums(model, batch).numerator
    b = forward_sums(model, batch, ctc_weight=0.5).numerator
    assert b.item() == pytest.approx(a.item() + 0.5 * ctc_sum(model, model.encode_audio(batch.audio_in), batch).item(),
                                     rel=1e-5)


def test_lr_schedule():
    c = TrainConfig(output_dir="x", train_data="x", model_config="x", lr=1.0, warmup_steps=10, max_steps=110)
    assert lr_at(0, c) == pytest.approx(1 / 11) and lr_at(9, c) == pytest.approx(10 / 11)
    assert lr_at(10, c) == pytest.approx(1.0) and lr_at(60, c) == pytest.approx(0.55)
    assert lr_at(110, c) == pytest.approx(0.1)


def test_precompute_cli_from_jsonl(tok, cfg, tmp_path):
    from lfm2_audio.audio.io import save_wav
    from lfm2_audio.training.data import main as precompute_main

    save_wav(tmp_path / "a.wav", _wave(12000, 4), 16000)
    rows = [{"messages": [{"role": "system", "content": "Perform ASR."},
                          {"role": "user", "content": [{"type": "audio", "path": "a.wav"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["hello"]}]},
            # a spoken question with its words: the clip's CTC target is the question, not the reply
            {"messages": [{"role": "user", "content": [{"type": "audio", "path": "a.wav", "transcript": "two plus two"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "four"}]}]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    rc = precompute_main([str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--config", str(tmp_path / "config.json"),
                          "--tokenizer", str(ASSETS / "tokenizer.json")])
    assert rc == 0
    store = SampleStore(tmp_path / "out")
    assert len(store) == 3 and len(store[0].audio_in) == 1 and store[0].audio_in[0].shape == (128, 76)
    assert store[1].text.tolist() == map_conversation([Message("user", ["hi"]), Message("assistant", ["hello"])], tok, cfg).text.tolist()
    assert store[0].transcripts == [None] and store[1].transcripts == []
    assert store[2].transcripts[0].tolist() == tok.encode("two plus two")
    batch = collate([[store[0], store[1]], [store[2]]])
    assert [t.tolist() for t in batch.transcripts] == [tok.encode("hello"), tok.encode("two plus two")]


def test_encoder_pretraining_clips_asr_or_every_transcribed_one(tok, cfg, tmp_path):
    from tokenizers import Tokenizer as BPE

    from lfm2_audio.training.data import FIRST_REGULAR_ID
    from lfm2_audio.training.encoder_ctc import EncoderPretrainConfig, load_clips

    asr, tts, s2s, text_only = _conversations(4, seed=3)
    spoken = Message("user", [Audio(_wave(16000, 5), 16000, transcript="two plus two")])
    s2s = [s2s[0], spoken, s2s[2]] + s2s[1:]  # a transcribed question first, then the untranscribed one
    precompute([asr, tts, s2s, text_only], tmp_path / "set", tok, cfg, FakeCodec())
    store = SampleStore(tmp_path / "set")
    ctc_tok = BPE.from_file(str(ASSETS / "tokenizer.json"))
    asr_words = asr[2].content[0]
    assert [t for _, t, _ in load_clips(store, tok, ctc_tok)] == [asr_words]
    clips = load_clips(store, tok, ctc_tok, which="transcribed")
    assert [t for _, t, _ in clips] == [asr_words, "two plus two"]
    assert clips[1][0].shape == store[2].audio_in[0].shape
    assert clips[1][2].tolist() == [i for i in ctc_tok.encode("two plus two").ids if i >= FIRST_REGULAR_ID]
    assert len(load_clips(store, tok, ctc_tok, limit=1, which="transcribed")) == 1
    with pytest.raises(InputError, match="clips"):
        EncoderPretrainConfig.from_dict(dict(model_config="c", tokenizer="t", ctc_tokenizer="x", train_data="d",
                                             output_dir="o", clips="all"))


def test_config_errors(dataset, tmp_path):
    with pytest.raises(InputError):
        TrainConfig.from_dict({"output_dir": "x", "train_data": "y", "model_config": "z", "lrr": 1})
    with pytest.raises(InputError):
        TrainConfig.from_dict({"output_dir": "x", "train_data": "y"})  # no model
    with pytest.raises(InputError):  # more rows per step than the data packs into
        train(_train_cfg(dataset, tmp_path / "r", batch_rows=64))
    toml = tmp_path / "t.toml"
    toml.write_text('output_dir = "o"\ntrain_data = "d"\nmodel_config = "c.json"\nbetas = [0.9, 0.99]\n')
    c = TrainConfig.from_file(toml, ["max_steps=7", "precision=fp32"])
    assert c.betas == [0.9, 0.99] and c.max_steps == 7 and c.precision == "fp32"
    from lfm2_audio.training.trainer import main

    assert main([str(toml), "lr=-1"]) == 2


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_skips_bf16_on_cpus_without_it(monkeypatch, capsys, native):
    import lfm2_audio.training.trainer as trainer

    monkeypatch.setattr(trainer, "native_half", lambda dtype: native)
    cpu = torch.device("cpu")
    for precision, bf16 in (("auto", native), ("bf16", True), ("fp32", False)):
        with trainer.autocast_for(precision, cpu)():
            assert torch.is_autocast_enabled("cpu") == bf16, precision
    said = capsys.readouterr().err
    assert ("no bf16 arithmetic" in said) == (not native)
    with pytest.raises(InputError, match="precision must be one of"):
        TrainConfig.from_dict({"output_dir": "o", "train_data": "d", "model_config": "c", "precision": "fp16"})


def test_overfit_one_batch(dataset, tmp_path):
    # 4 samples in one row of 2048 positions: every step sees the same batch
    out = tmp_path / "overfit"
    cfg = _train_cfg(dataset, out, train_data=str(dataset / "val"), context_length=2048, batch_rows=1,
                     max_steps=30, warmup_steps=3, lr=1e-2, precision="bf16")
    result = train(cfg)
    losses = [r["train"]["loss"] for r in _log(out) if "train" in r]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    again = LFM2AudioModel.from_pretrained(out / "final")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), result.model.state_dict().values()))


def test_exact_resume(dataset, tmp_path):
    straight = train(_train_cfg(dataset, tmp_path / "a", save_every=3, val_data=str(dataset / "val"), eval_every=3))
    assert (tmp_path / "a" / "checkpoints" / "step-0000003" / "optimizer.pt").is_file()
    resumed = train(_train_cfg(dataset, tmp_path / "b", save_every=3,
                               resume=str(tmp_path / "a" / "checkpoints" / "step-0000003")))
    assert resumed.step == straight.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # dead parameters were never touched by the optimiser
    fresh = LFM2AudioModel.from_pretrained(tmp_path / "a" / "checkpoints" / "step-0000003" / "model")
    assert torch.equal(fresh.audio_embedding.to_logits.weight, straight.model.audio_embedding.to_logits.weight)
    assert straight.val is not None and math.isfinite(straight.val["loss"])
    # resume="auto" on a finished run finds its last checkpoint and has nothing left to do
    again = train(_train_cfg(dataset, tmp_path / "a", save_every=3))
    assert again.step == 6 and torch.equal(again.model.lfm.embed_tokens.weight, straight.model.lfm.embed_tokens.weight)


def test_grad_accumulation_matches_bigger_batch(dataset, tmp_path):
    big = train(_train_cfg(dataset, tmp_path / "big", batch_rows=2, max_steps=3))
    acc = train(_train_cfg(dataset, tmp_path / "acc", batch_rows=1, grad_accum_steps=2, max_steps=3))
    for (name, a), b in zip(big.model.state_dict().items(), acc.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3, msg=name)


def test_ddp_two_processes_gloo(dataset, tmp_path):
    out = tmp_path / "ddp"
    cfg = _train_cfg(dataset, out, batch_rows=1, max_steps=3, threads=1)
    config_file = tmp_path / "ddp.json"
    config_file.write_text(json.dumps({k: v for k, v in vars(cfg).items()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "lfm2_audio.training.trainer", str(config_file)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [r["done"] for r in _log(out) if "done" in r][-1]
    assert done == {"step": 3, "ranks_in_sync": True, "world_size": 2}
    # the same global batch in one process gives the same update (loss normalised globally)
    single = train(_train_cfg(dataset, tmp_path / "one", batch_rows=2, max_steps=3))
    ddp = LFM2AudioModel.from_pretrained(out / "final")
    for (name, a), b in zip(single.model.state_dict().items(), ddp.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3, msg=name)


# ---- encoder pretraining -----------------------------------------------------------------------


def test_encoder_pretraining_learns_and_seeds_a_fresh_model(dataset, tmp_path):
    from lfm2_audio.training.encoder_ctc import EncoderPretrainConfig, pretrain

    base = dict(model_config=str(dataset / "config.json"), tokenizer=str(dataset / "assets"),
                ctc_tokenizer=str(ASSETS / "tokenizer.json"), train_data=str(dataset / "train"),
                val_data=str(dataset / "train"), output_dir=str(tmp_path / "enc"), batch_clips=3, lr=3e-3,
                warmup_steps=2, max_steps=40, precision="fp32", log_every=1, eval_every=40, threads=1)
    lines = []
    result = pretrain(EncoderPretrainConfig.from_dict(base), log=lines.append)
    losses = [json.loads(x)["ctc"] for x in (tmp_path / "enc" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and losses[-1] < 0.5 * losses[0], losses
    assert "3 training clips" in lines[0]  # the ASR samples only
    assert result["val_ctc"] < 0.5 * losses[0] and 0 <= result["val_wer"] <= 1.0

    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "enc" / "encoder.safetensors"))
    out = tmp_path / "full"
    model = train(_train_cfg(dataset, out, max_steps=1, lr=1e-9, init_encoder_from=str(tmp_path / "enc"))).model
    for name, value in model.state_dict().items():
        if name.startswith("conformer."):
            assert torch.allclose(value, saved[name], atol=1e-6), name  # one step at lr 1e-9 moves nothing

    with pytest.raises(InputError, match="ctc_tokenizer"):
        EncoderPretrainConfig.from_dict({k: v for k, v in base.items() if k != "ctc_tokenizer"})
    with pytest.raises(InputError, match="init_from already has an encoder"):
        TrainConfig.from_dict(dict(output_dir="x", train_data="y", init_from="z", init_encoder_from="e"))
    wrong = json.loads(json.dumps(TINY))
    wrong["encoder"]["d_model"] *= 2
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(InputError, match="does not fit"):
        train(_train_cfg(dataset, tmp_path / "w", model_config=str(tmp_path / "wrong.json"),
                         init_encoder_from=str(tmp_path / "enc")))

"""The CUDA graph decode path (generation/cuda_graphs.py) against the plain eager path.

Off CUDA the graph path runs its static-buffer step functions eagerly, so everything but the
capture itself (bucketing, device-side positions, per-row activity, pooled caches, in-graph
sampling) is checked here on CPU; the tests marked `cuda` repeat the comparison with real
graphs (and torch.compile) and skip without a GPU.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import prompted_conversation, tiny_config
from lfm2_audio.config import END_OF_AUDIO
from lfm2_audio.generation.cuda_graphs import batch_bucket, key_bucket, pick
from lfm2_audio.generation.fast import FastLFM2Audio
from lfm2_audio.generation.generate import generate
from lfm2_audio.generation.sampling import Sampling
from lfm2_audio.model.lfm2 import Lfm2Cache
from lfm2_audio.model.lfm2_audio import random_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device; the CPU tests cover the same code eagerly")


_conversation = prompted_conversation


def _run(model, mode, steps=32, **kw):
    force = (128,) if mode == "sequential" else ()
    conv = _conversation(model)
    events = list(generate(conv, mode, max_new_tokens=steps, force_tokens=force, **kw))
    return events, conv


def _items(events):
    return [(e.kind, e.token if e.kind == "text" else tuple(e.frame.tolist())) for e in events if e.kind != "end"]


def _block(cache: Lfm2Cache, n: int, max_len: int) -> Lfm2Cache:
    """Rows [0, n) of a cache, as the serving engine's slot cache hands them to a step."""
    return Lfm2Cache([t[:n] for t in cache.conv], [t[:n] for t in cache.keys], [t[:n] for t in cache.values],
                     cache.lengths[:n], max_len)


def _engine(plain, **kw):
    return FastLFM2Audio(copy.deepcopy(plain), threads=0, cuda_graphs=True, **kw)


@pytest.fixture(scope="module")
def plain():
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def engine(plain):
    return _engine(plain)


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 16, 17, 100, 256, 257, 600)] == [1, 2, 4, 8, 16, 32, 128, 256, 512, 768]
    assert key_bucket(1, 4096) == 256 and key_bucket(256, 4096) == 256 and key_bucket(257, 4096) == 512
    assert key_bucket(3000, 4096) == 4096 and key_bucket(10, 100) == 100  # never past the capacity


def test_selected_only_where_asked(plain):
    assert not FastLFM2Audio(copy.deepcopy(plain), threads=0).cuda_graphs  # CPU default: the fast path
    assert _engine(plain).cuda_graphs
    with pytest.raises(ValueError):
        FastLFM2Audio(copy.deepcopy(plain), threads=0, cuda_graphs=True, exact=True)


@pytest.mark.parametrize("mode", ["interleaved", "sequential"])
def test_generate_matches_plain(plain, engine, mode):
    want, conv_p = _run(plain, mode)
    got, conv_f = _run(engine, mode)
    assert _items(got) == _items(want)
    assert sum(e.kind == "audio" for e in want) > 8
    assert engine.lfm._stores and all(s.graphs for s in engine.lfm._stores.values())  # the graph step ran
    n = conv_p.cache.max_len
    assert conv_f.cache.max_len == n and int(conv_f.cache.lengths) == n
    torch.testing.assert_close(conv_f.cache.keys[0][:, :, :n], conv_p.cache.keys[0][:, :, :n], rtol=1e-4, atol=1e-5)


def test_details_and_next_turn(plain, engine):
    """details=True asks for logits (the eager frame), the backbone still steps from graphs."""
    want, conv_p = _run(plain, "interleaved", steps=20)
    got, conv_f = _run(engine, "interleaved", steps=20, details=True)
    assert _items(got) == _items(want)
    for conv in (conv_p, conv_f):
        conv.add_tokens([20, 21, 22])
        conv.role = "assistant"
    torch.testing.assert_close(conv_f.prefill(), conv_p.prefill(), rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_rows_at_different_positions(plain, engine):
    """The serving engine's pattern: a block of rows [0, n) steps while the other rows of the
    same cache (and a bucket's padding rows) must stay untouched."""
    D = plain.cfg.lfm.hidden_size
    cp, cf = plain.lfm.new_cache(5, 64), engine.lfm.new_cache(5, 64)
    emb = torch.randn(5, 7, D)
    torch.testing.assert_close(engine.lfm(emb, cf), plain.lfm(emb, cp), rtol=1e-4, atol=1e-5)
    lengths = [7] * 5
    for n in (3, 3, 1, 5, 2, 5, 4):  # buckets 4, 1, 8, 2, 4 over storage rows 8
        step = torch.randn(n, 1, D)
        ml = max(lengths[:n])
        want = plain.lfm(step, _block(cp, n, ml))
        got = engine.lfm(step, _block(cf, n, ml))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        lengths[:n] = [x + 1 for x in lengths[:n]]
    assert cf.lengths.tolist() == cp.lengths.tolist() == lengths
    for a, b in zip(cf.conv + cf.keys + cf.values, cp.conv + cp.keys + cp.values):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    store = engine.lfm._store_of(cf)
    assert store is not None and store.cache.lengths.shape[0] == 8
    assert store.cache.lengths[5:].tolist() == [0, 0, 0]  # padding rows never advanced
    assert {rows for rows, _, _ in store.graphs} == {1, 2, 4, 8}


@torch.inference_mode()
def test_prefill_chunks_at_different_positions(plain, engine):
    """Chunks of S > 1 positions run padded to a bucket; only the real positions are written
    (the rest of the cache stays as the plain path leaves it)."""
    D = plain.cfg.lfm.hidden_size
    cp, cf = plain.lfm.new_cache(3, 400), engine.lfm.new_cache(3, 400)
    lengths = [0] * 3
    # (the last chunk would need positions past the capacity once padded: the fast path)
    for n, S in ((3, 5), (2, 70), (1, 1), (3, 2), (3, 64), (1, 130), (3, 1), (2, 100)):
        x = torch.randn(n, S, D)
        ml = max(lengths[:n])
        torch.testing.assert_close(engine.lfm(x, _block(cf, n, ml)), plain.lfm(x, _block(cp, n, ml)), rtol=1e-4, atol=1e-5)
        lengths[:n] = [v + S for v in lengths[:n]]
    assert cf.lengths.tolist() == cp.lengths.tolist() == lengths
    for a, b in zip(cf.conv + cf.keys + cf.values, cp.conv + cp.keys + cp.values):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    spans = {span for _, span, _ in engine.lfm._store_of(cf).graphs}
    assert spans == {1, 64, 128, 256}


@torch.inference_mode()
def test_encoder_padded_to_a_bucket(plain, engine):
    g = torch.Generator().manual_seed(3)
    for T in (37, 250, 256):
        f = torch.randn(128, T, generator=g)
        torch.testing.assert_close(engine.encode_audio([f]), plain.encode_audio([f]), rtol=1e-4, atol=1e-5)
    assert set(engine.encoder._graphs) == {128, 256}
    two = [torch.randn(128, 40, generator=g), torch.randn(128, 90, generator=g)]
    torch.testing.assert_close(engine.encode_audio(two), plain.encode_audio(two))  # the model's own


@torch.inference_mode()
def test_pooled_cache_reused_zeroed(engine):
    c = engine.lfm.new_cache(1, 48)
    engine.lfm(torch.randn(1, 3, 64), c)
    engine.lfm(torch.randn(1, 1, 64), c)
    store = engine.lfm._store_of(c)
    other = engine.lfm.new_cache(1, 48)  # the first is still held: a second storage
    assert engine.lfm._store_of(other) is not store
    del c
    again = engine.lfm.new_cache(1, 48)
    assert engine.lfm._store_of(again) is store and store.graphs  # graphs kept for the next user
    assert int(again.lengths) == 0 and again.max_len == 0
    assert all(not t.any() for t in again.conv + again.keys + again.values)


@torch.inference_mode()
def test_foreign_cache_takes_fast_path(plain, engine):
    """A cache the engine did not hand out (or a row view not at row 0) runs the fast path."""
    c = plain.lfm.new_cache(3, 16)
    engine.lfm(torch.randn(3, 4, 64), c)
    out = engine.lfm(torch.randn(3, 1, 64), c)
    assert out.shape == (3, 1, 64) and c.max_len == 5 and c.lengths.tolist() == [5, 5, 5]
    mine = engine.lfm.new_cache(3, 16)
    row1 = Lfm2Cache([t[1:2] for t in mine.conv], [t[1:2] for t in mine.keys], [t[1:2] for t in mine.values],
                     mine.lengths[1:2], 0)
    assert engine.lfm._store_of(row1) is None


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_greedy_frame_matches_plain(plain, engine, batch):
    h = torch.randn(batch, plain.cfg.lfm.hidden_size) * 3
    assert torch.equal(engine.sample_frame(h), plain.sample_frame(h))


@torch.inference_mode()
def test_sampled_frame_is_the_noise_draw(plain, engine):
    """With the generator's Exp(1) noise, each code is argmax(p / noise) of the plain path's
    logits given the codes before it (temperature and top-k applied, end-of-audio only in
    codebook 0), and lies in the top-k."""
    params = Sampling(temperature=0.8, top_k=7)
    h = torch.randn(3, plain.cfg.lfm.hidden_size) * 3
    codes = engine.sample_frame(h, params, torch.Generator().manual_seed(5))
    K, V = plain.cfg.codebooks, END_OF_AUDIO + 1
    noise = torch.empty(4, K, V).exponential_(generator=torch.Generator().manual_seed(5))[:3]  # bucket 4
    logits = plain.depth_logits_teacher_forced(h, codes)
    logits[:, 1:, END_OF_AUDIO] = float("-inf")
    want = torch.stack([pick(logits[:, k], torch.tensor(0.8), noise[:, k], 7) for k in range(K)], dim=1)
    assert torch.equal(codes, want)
    top = logits.topk(7, dim=-1).indices
    assert (top == codes[..., None]).any(-1).all()
    # Same seed, same frame; the eager fast path handles top-p.
    assert torch.equal(engine.sample_frame(h, params, torch.Generator().manual_seed(5)), codes)
    assert engine.sample_frame(h, Sampling(temperature=0.8, top_p=0.9), torch.Generator().manual_seed(5)).shape == (3, K)


def test_pick_draws_from_the_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    logits = p.log().expand(40000, -1)
    noise = torch.empty(40000, 5).exponential_(generator=g)
    freq = torch.bincount(pick(logits, torch.tensor(1.0), noise), minlength=5).float() / 40000
    torch.testing.assert_close(freq, p, rtol=0, atol=0.01)
    half = torch.bincount(pick(logits, torch.tensor(1.0), noise, top_k=2), minlength=5).float() / 40000
    torch.testing.assert_close(half, torch.tensor([0, 0, 3 / 7, 4 / 7, 0]), rtol=0, atol=0.01)
    assert torch.equal(pick(logits[:3]), torch.full((3,), 3))


@torch.inference_mode()
def test_bf16_close_to_plain():
    """bf16: prefill and decode states agree with the plain path to bf16 rounding, and greedy
    frames from the same states agree (a code may flip where two logits are within rounding)."""
    plain = random_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    engine = _engine(plain)
    D = plain.cfg.lfm.hidden_size
    g = torch.Generator().manual_seed(0)
    cp, cf = plain.lfm.new_cache(2, 128), engine.lfm.new_cache(2, 128)
    x = torch.randn(2, 20, D, generator=g).bfloat16()
    for step in range(6):
        want, got = plain.lfm(x, cp).float(), engine.lfm(x, cf).float()
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999, step
        x = torch.randn(2, 1, D, generator=g).bfloat16()
    h = (torch.randn(16, D, generator=g) * 3).bfloat16()
    agree = (engine.sample_frame(h) == plain.sample_frame(h)).float().mean()
    assert agree >= 0.9, agree


# ---- on a GPU: real graphs ---------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled"])
def test_cuda_graphs_match_plain(compile):
    plain = random_model(tiny_config(), device="cuda", seed=0)
    engine = _engine(plain, compile=compile)
    assert engine.cuda_graphs
    for mode in ("interleaved", "sequential"):
        want, _ = _run(plain, mode)
        got, _ = _run(engine, mode)
        assert _items(got) == _items(want)
    assert all(s.graphs for s in engine.lfm._stores.values())
    assert all(g.run.graph is not None for g in engine.depth._graphs.values())
    with torch.inference_mode():
        D = plain.cfg.lfm.hidden_size
        cp, cf = plain.lfm.new_cache(5, 300), engine.lfm.new_cache(5, 300)
        emb = torch.randn(5, 250, D, device="cuda")
        plain.lfm(emb, cp), engine.lfm(emb, cf)
        lengths = [250] * 5
        for n in (3, 5, 1, 5, 5, 5, 5, 5, 5):  # crosses the 256-key bucket
            step = torch.randn(n, 1, D, device="cuda")
            ml = max(lengths[:n])
            torch.testing.assert_close(engine.lfm(step, _block(cf, n, ml)), plain.lfm(step, _block(cp, n, ml)),
                                       rtol=1e-3, atol=1e-4)
            lengths[:n] = [x + 1 for x in lengths[:n]]
        assert cf.lengths.tolist() == lengths
        h = torch.randn(5, D, device="cuda") * 3
        assert torch.equal(engine.sample_frame(h), plain.sample_frame(h))
        params = Sampling(temperature=0.8, top_k=7)
        a = engine.sample_frame(h, params, torch.Generator("cuda").manual_seed(1))
        b = engine.sample_frame(h, params, torch.Generator("cuda").manual_seed(1))
        assert torch.equal(a, b) and (a[:, 1:] != END_OF_AUDIO).all()


@needs_cuda
def test_cuda_bf16_logits_close():
    plain = random_model(tiny_config(), dtype=torch.bfloat16, device="cuda", seed=0)
    engine = _engine(plain)
    with torch.inference_mode():
        D = plain.cfg.lfm.hidden_size
        cp, cf = plain.lfm.new_cache(2, 64), engine.lfm.new_cache(2, 64)
        emb = torch.randn(2, 9, D, device="cuda", dtype=torch.bfloat16)
        plain.lfm(emb, cp), engine.lfm(emb, cf)
        for _ in range(4):
            step = torch.randn(2, 1, D, device="cuda", dtype=torch.bfloat16)
            want, got = plain.lfm(step, cp).float(), engine.lfm(step, cf).float()
            assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999

"""The fast decode engine against the plain eager path, and int8 weight quantization."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import prompted_conversation, tiny_config
from lfm2_audio.config import END_OF_AUDIO
from lfm2_audio.generation.fast import FastLFM2Audio, can_prepack
from lfm2_audio.generation.generate import generate
from lfm2_audio.generation.sampling import Sampling
from lfm2_audio.model import cpu_kernels
from lfm2_audio.model.lfm2_audio import random_model
from lfm2_audio.model.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int8,
    int4_linear,
    int8_dynamic_linear,
    int8_linear,
    quantize_int4,
    quantize_int8,
    quantize_linear,
    quantize_model,
)


_conversation = prompted_conversation


def _run(model, mode, steps=32, **kw):
    force = (128,) if mode == "sequential" else ()  # <|audio_start|>: the sequential run speaks
    conv = _conversation(model)
    events = [e for e in generate(conv, mode, max_new_tokens=steps, details=True, force_tokens=force, **kw)]
    return events, conv


def _items(events):
    return [(e.kind, e.token if e.kind == "text" else tuple(e.frame.tolist())) for e in events if e.kind != "end"]


@pytest.fixture(scope="module")
def plain():
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="module", params=[False, True], ids=["default", "exact"])
def fast(request, plain):
    # A copy: the engine may re-home the weights it concatenates.
    return FastLFM2Audio(copy.deepcopy(plain), exact=request.param, threads=0)


def _close(fast):
    """exact=True: the plain path's ops, bit for bit. Default: two small ops are rewritten as
    elementwise fp32 math (same values up to rounding)."""
    return {"rtol": 0, "atol": 0} if fast.depth.exact else {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("mode", ["interleaved", "sequential"])
def test_fast_matches_plain_fp32(plain, fast, mode):
    want, conv_p = _run(plain, mode)
    got, conv_f = _run(fast, mode)
    assert _items(got) == _items(want)
    assert sum(e.kind == "audio" for e in want) > 8 and sum(e.kind == "text" for e in want) >= 1
    for a, b in zip(want, got):
        if a.kind == "end":
            continue
        torch.testing.assert_close(b.hidden, a.hidden, **_close(fast))
        torch.testing.assert_close(b.logits, a.logits, **_close(fast))
    assert conv_f.record.modality == conv_p.record.modality
    torch.testing.assert_close(conv_f.cache.keys[0], conv_p.cache.keys[0], **_close(fast))


def test_fast_sampling_and_next_turn(plain, fast):
    """Same generator seed -> same sampled stream; the cache then serves the next turn."""
    params = Sampling(temperature=0.9, top_k=8)
    want, conv_p = _run(plain, "interleaved", steps=20, text_sampling=params, audio_sampling=params, seed=3)
    got, conv_f = _run(fast, "interleaved", steps=20, text_sampling=params, audio_sampling=params, seed=3)
    assert _items(got) == _items(want)
    for conv in (conv_p, conv_f):
        conv.add_tokens([20, 21, 22])
        conv.role = "assistant"
    torch.testing.assert_close(conv_f.prefill(), conv_p.prefill(), **_close(fast))


@torch.inference_mode()
def test_batched_decode_matches_rows(plain, fast):
    h0 = torch.randn(3, plain.cfg.lfm.hidden_size)
    torch.testing.assert_close(fast.sample_frame(h0), plain.sample_frame(h0), rtol=0, atol=0)
    emb = torch.randn(3, 5, plain.cfg.lfm.hidden_size)
    caches = [m.lfm.new_cache(3, 16) for m in (plain, fast)]
    outs = [m.lfm(emb, c) for m, c in zip((plain, fast), caches)]
    torch.testing.assert_close(outs[1], outs[0], **_close(fast))
    step = torch.randn(3, 1, plain.cfg.lfm.hidden_size)
    outs = [m.lfm(step, c) for m, c in zip((plain, fast), caches)]
    torch.testing.assert_close(outs[1], outs[0], **_close(fast))


def test_ragged_batch_step_matches_plain(plain, fast):
    """Rows at different positions in one cache (the serving engine's batch) take the fast
    path too: per-row rotary angles, cache slots and key masks, one position or several."""
    D = plain.cfg.lfm.hidden_size
    caches = [m.lfm.new_cache(3, 32) for m in (plain, fast)]
    for row, n in enumerate((7, 2, 5)):  # each row's own prompt, prefilled alone
        emb = torch.randn(1, n, D)
        for m, c in zip((plain, fast), caches):
            view = type(c)(conv=[t[row : row + 1] for t in c.conv], keys=[t[row : row + 1] for t in c.keys],
                           values=[t[row : row + 1] for t in c.values], lengths=c.lengths[row : row + 1], max_len=0)
            m.lfm(emb, view)
    for c in caches:
        c.max_len = 7
    for _ in range(3):
        step = torch.randn(3, 1, D)
        outs = [m.lfm(step, c) for m, c in zip((plain, fast), caches)]
        torch.testing.assert_close(outs[1], outs[0], **_close(fast))
    assert caches[1].lengths.tolist() == caches[0].lengths.tolist() == [10, 5, 8] and caches[1].max_len == 10
    # Several positions per row at once (the engine's batched prefill of later turns).
    chunk = torch.randn(3, 4, D)
    outs = [m.lfm(chunk, c) for m, c in zip((plain, fast), caches)]
    torch.testing.assert_close(outs[1], outs[0], **_close(fast))
    assert caches[1].lengths.tolist() == caches[0].lengths.tolist() == [14, 9, 12] and caches[1].max_len == 14
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        torch.testing.assert_close(b[:, :, :14], a[:, :, :14], **_close(fast))


@pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN's bf16 path (AVX-512)")
def test_fast_bf16_prepacked():
    plain = random_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    exact = FastLFM2Audio(copy.deepcopy(plain), exact=True, threads=0)
    assert exact.prepack
    want, _ = _run(plain, "interleaved", steps=20)
    got, _ = _run(exact, "interleaved", steps=20)
    assert _items(got) == _items(want)
    for a, b in zip(want, got):
        if a.kind != "end":
            assert torch.equal(a.logits, b.logits)  # prepacked oneDNN GEMV == F.linear, bit for bit
    # Default engine: the depth attention in fp32 rounds differently from bf16 SDPA; one frame
    # from the same state agrees to bf16 rounding (later steps may drift apart on a random model).
    fast = FastLFM2Audio(copy.deepcopy(plain), threads=0)
    h = want[6].hidden[None]
    with torch.inference_mode():
        _, ref = plain.sample_frame(h, return_logits=True)
        _, got_logits = fast.sample_frame(h, return_logits=True)
    assert F.cosine_similarity(got_logits.float().flatten(), ref.float().flatten(), dim=0) > 0.999


@pytest.mark.parametrize("native", [True, False])
def test_wide_half_matmuls_run_in_fp32_without_half_arithmetic(monkeypatch, native):
    """On a CPU without bf16 arithmetic, many rows of a bf16 matmul (prefill) run in fp32: the
    weight widened by cpu_kernels' GEMM (more than 4 rows), or converted for oneDNN (16+ rows, where
    the kernels cannot build); fewer rows, exact engines and CPUs with bf16 arithmetic keep torch's
    bf16 op."""
    from lfm2_audio.generation.fast import FusedLinear
    from lfm2_audio.model import quantize

    monkeypatch.setattr(quantize, "native_half", lambda dtype: native)
    lin = torch.nn.Linear(64, 40).to(torch.bfloat16)
    fast, exact = FusedLinear([lin], prepack=False), FusedLinear([lin], prepack=False, exact=True)
    kernels = cpu_kernels.library() is not None
    for rows in (1, 5, 15, 16, 30):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        wide = rows >= quantize.WIDE_ROWS and not native
        assert quantize.matmul_dtype(x) == (torch.float32 if wide else torch.bfloat16)
        assert quantize.use_cpu_gemm(x) == (kernels and cpu_kernels.MAX_ROWS < rows <= cpu_kernels.GEMM_MAX_ROWS
                                            and not native)
        bf16 = F.linear(x, lin.weight, lin.bias)
        fp32 = (x.float() @ lin.weight.float().T + lin.bias.float()).to(torch.bfloat16)
        if wide or quantize.use_cpu_gemm(x):  # fp32 sums in another order: within one bf16 rounding
            torch.testing.assert_close(fast(x), fp32, rtol=8e-3, atol=1e-3)
        else:
            assert torch.equal(fast(x), bf16)
        assert torch.equal(exact(x), bf16)
    q, s = quantize_int8(lin.weight.float())
    x = torch.randn(30, 64).to(torch.bfloat16)
    want = x.float() @ (q.float() * s.float()[:, None]).T if not native else F.linear(x, q.to(x.dtype)) * s
    torch.testing.assert_close(int8_linear(x, q, s).float(), want.float(), rtol=1e-2, atol=1e-2)


@torch.inference_mode()
def test_encoder_runs_an_fp32_copy_without_half_arithmetic(monkeypatch):
    from lfm2_audio.generation import fast as fast_module

    model = random_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    features = [torch.randn(model.cfg.encoder.feat_in, 90), torch.randn(model.cfg.encoder.feat_in, 41)]
    want = copy.deepcopy(model).float().encode_audio(features)
    monkeypatch.setattr(fast_module, "native_half", lambda dtype: False)
    engine = FastLFM2Audio(model, threads=0)
    got = engine.encode_audio(features)
    assert engine._encoder32 is not None and got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got, want.to(torch.bfloat16))  # the fp32 result, rounded once
    assert FastLFM2Audio(model, threads=0, exact=True)._encoder32 is None
    monkeypatch.setattr(fast_module, "native_half", lambda dtype: True)  # (prepack would believe it too)
    assert FastLFM2Audio(model, threads=0, prepack=False)._encoder32 is None


# ---- int8 ------------------------------------------------------------------------------------


def test_int8_roundtrip_and_kernel():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.abs().max() <= 127
    deq = dequantize_int8(q, s)
    step = s.float()[:, None]
    assert ((deq - w).abs() <= 0.5 * step + 1e-7).all()  # each entry within half a step
    for dtype, rows in ((torch.bfloat16, 1), (torch.bfloat16, 3), (torch.bfloat16, 40), (torch.float32, 2)):
        x = torch.randn(rows, 64, dtype=dtype)
        got = int8_linear(x, q, s).float()
        ref = x.float() @ deq.T  # the dequantized reference matmul, in fp32
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())
    lin = torch.nn.Linear(64, 96)
    qlin = quantize_linear(lin, "int8")
    assert isinstance(qlin, Int8Linear)
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(qlin(x), x @ qlin.dequantized().T + lin.bias, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_int8_model_quality_and_engine():
    model = random_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    qmodel = quantize_model(copy.deepcopy(model), "int8")
    assert isinstance(qmodel.lfm.layers[0].feed_forward.w1, Int8Linear)
    assert isinstance(qmodel.depthformer.layers[0].operator.qkv_proj, Int8Linear)
    assert qmodel.lfm.text_head is not None
    # Text logits along the same (teacher-forced) positions stay close to the unquantized ones.
    emb = torch.randn(1, 40, model.cfg.lfm.hidden_size, dtype=torch.bfloat16)
    ref = model.text_logits(model.lfm(emb)).float()
    got = qmodel.text_logits(qmodel.lfm(emb)).float()
    cos = F.cosine_similarity(got[0], ref[0], dim=-1)
    assert cos.min() >= 0.99, cos.min()
    # The engine over the quantized model runs the plain path's int8 numbers.
    fast = FastLFM2Audio(qmodel, exact=True, threads=0)
    want, _ = _run(qmodel, "interleaved", steps=24)
    got, _ = _run(fast, "interleaved", steps=24)
    assert _items(got) == _items(want)
    for a, b in zip(want, got):
        if a.kind != "end":
            torch.testing.assert_close(b.logits.float(), a.logits.float(), rtol=2e-2, atol=2e-2)
    # Int8 weights and bf16 scales: just over half the backbone's bf16 bytes.
    assert fast.lfm.bytes_per_step < 0.55 * FastLFM2Audio(model, threads=0).lfm.bytes_per_step


def test_int8_dynamic_kernel_and_engine():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    q, s = quantize_int8(w)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    # Reference: the same per-row activation rounding, then exact integer products.
    a = x.float()
    amax = a.abs().amax(-1, keepdim=True)
    xq = (a * (127.0 / amax)).round()
    ref = (xq @ q.float().T) * (amax / 127.0) * s.float()
    got = int8_dynamic_linear(x, q, s.float() / 127.0)
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    close = (got.float() - x.float() @ dequantize_int8(q, s).T).norm() / ref.norm()
    assert close < 0.02  # activation rounding adds ~1%

    model = random_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    qmodel = quantize_model(model, "int8-dyn", depthformer=False)
    assert isinstance(qmodel.depth_linear, torch.nn.Linear) and qmodel.lfm.layers[0].feed_forward.w1.dynamic
    want, _ = _run(qmodel, "interleaved", steps=16)
    got, _ = _run(FastLFM2Audio(qmodel, exact=True, threads=0), "interleaved", steps=16)
    assert _items(got) == _items(want)


@torch.inference_mode()
def test_int4_roundtrip_kernel_and_engine():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    codes, sz = quantize_int4(w)
    assert codes.dtype == torch.uint8 and codes.max() <= 15 and sz.shape == (2, 96, 2)
    lin = Int4Linear(codes, sz, None)
    scale, zero = (sz[..., i].t().float().repeat_interleave(32, dim=1) for i in (0, 1))
    deq = (codes.float() - 8) * scale + zero
    assert ((deq - w).abs() <= 0.5 * scale + 1e-6).all()  # each entry within half a step
    torch.testing.assert_close(lin.dequantized(), deq, rtol=1e-6, atol=1e-6)  # the kernel's weight
    for dtype, rows in ((torch.bfloat16, 1), (torch.bfloat16, 40), (torch.float32, 2)):
        x = torch.randn(rows, 64, dtype=dtype)
        got = int4_linear(x, lin.weight, sz).float()
        ref = x.float() @ deq.T
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())

    model = random_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    qmodel = quantize_model(copy.deepcopy(model), "int4")
    assert isinstance(qmodel.lfm.layers[0].feed_forward.w1, Int4Linear) and isinstance(qmodel.lfm.text_head, Int4Linear)
    emb = torch.randn(1, 40, model.cfg.lfm.hidden_size, dtype=torch.bfloat16)
    ref = model.text_logits(model.lfm(emb)).float()
    got = qmodel.text_logits(qmodel.lfm(emb)).float()
    assert F.cosine_similarity(got[0], ref[0], dim=-1).min() >= 0.95
    # The engine over the int4 model (q/k/v and w1/w3 fused, one row per depth step where the
    # plain depthformer runs all positions) computes the plain path's int4 numbers to rounding:
    # the kernel's sums for a row depend on how many rows it is given.
    fast = FastLFM2Audio(qmodel, exact=True, threads=0)
    h = torch.randn(3, model.cfg.lfm.hidden_size, dtype=torch.bfloat16)
    _, want = qmodel.sample_frame(h, return_logits=True)
    _, got = fast.sample_frame(h, return_logits=True)
    assert F.cosine_similarity(got.float().flatten(1), want.float().flatten(1), dim=-1).min() > 0.999
    assert F.cosine_similarity(fast.text_logits(h).float(), qmodel.text_logits(h).float(), dim=-1).min() > 0.999
    # Packed codes and bf16 scales and zeros: under a third of the backbone's bf16 bytes.
    assert fast.lfm.bytes_per_step < 0.33 * FastLFM2Audio(model, threads=0).lfm.bytes_per_step


def test_end_of_audio_only_from_codebook0(plain, fast):
    h = torch.randn(4, plain.cfg.lfm.hidden_size) * 5
    frame, logits = fast.sample_frame(h, return_logits=True)
    assert (frame[:, 1:] != END_OF_AUDIO).all()
    assert logits.shape == (4, plain.cfg.codebooks, END_OF_AUDIO + 1)

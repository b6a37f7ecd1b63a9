"""The hand-written CPU decode kernels (model/cpu_kernels.c) against torch, and their use by the
fast engine (one-row products, the depthformer step) and the int8 modules."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from lfm2_audio.generation.fast import FastLFM2Audio
from lfm2_audio.generation.sampling import GREEDY, Sampling
from lfm2_audio.model import cpu_kernels
from lfm2_audio.model.lfm2_audio import random_model
from lfm2_audio.model.quantize import dequantize_int8, quantize_int8, quantize_model

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None,
                                reason="the CPU kernels need an x86 CPU with AVX2 and a C compiler")

# (rows out, columns in): whole 64-column steps, column tails, row counts that do not split evenly
SHAPES = [(1, 8), (5, 7), (33, 100), (256, 256), (130, 1091), (2049, 1024)]
BF16_ULP = 2.0 ** -8  # relative spacing of bf16 values: one output rounding


def _reference(x, w, bias=None):
    y = x.float() @ w.float().T
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_kernel_equals_fp32_product_rounded_once(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(rows, k, generator=g).bfloat16()
        bias = torch.randn(n, generator=g).bfloat16() if with_bias else None
        got = cpu_kernels.bf16_linear(x, w, bias)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        want = _reference(x, w, bias)
        # fp32 sums in another order, then one rounding to bf16
        torch.testing.assert_close(got.float(), want, rtol=BF16_ULP, atol=1e-4 * k ** 0.5)


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_int8_kernel_equals_dequantized_product(rows):
    g = torch.Generator().manual_seed(10 + rows)
    for n, k in SHAPES:
        q, s = quantize_int8(torch.randn(n, k, generator=g))
        x = torch.randn(rows, k, generator=g).bfloat16()
        bias = torch.randn(n, generator=g).bfloat16()
        got = cpu_kernels.int8_linear(x, q, s.float(), bias)
        want = _reference(x, dequantize_int8(q, s), bias)
        # the activations' int16 rounding adds at most 2^-16 of the row's largest entry per term
        atol = 1e-4 * k ** 0.5 + k * 2.0 ** -16 * x.float().abs().max() * dequantize_int8(q, s).abs().max()
        torch.testing.assert_close(got.float(), want, rtol=BF16_ULP, atol=float(atol))


def test_columns_past_an_int32_block_and_large_values():
    """Thousands of columns of the largest int8 and int16 values: the int32 sums stay exact."""
    k = 8192 + 64 + 5
    q = torch.full((3, k), 127, dtype=torch.int8)
    q[1] = -127
    s = torch.ones(3)
    x = torch.full((1, k), 3.0e4).bfloat16()
    got = cpu_kernels.int8_linear(x, q, s).float()
    want = x.float() @ q.float().T
    torch.testing.assert_close(got, want, rtol=BF16_ULP, atol=0)


def test_non_finite_rows_give_nan_and_leave_other_rows_alone():
    w = torch.randn(16, 64).bfloat16()
    q, s = quantize_int8(w.float())
    x = torch.randn(2, 64).bfloat16()
    x[0, 5] = float("nan")
    for got, want in ((cpu_kernels.bf16_linear(x, w), _reference(x[1:], w)),
                      (cpu_kernels.int8_linear(x, q, s.float()), _reference(x[1:], dequantize_int8(q, s)))):
        assert torch.isnan(got[0]).all()
        torch.testing.assert_close(got[1:].float(), want, rtol=2e-2, atol=2e-2)
    x = torch.zeros(1, 64).bfloat16()
    assert (cpu_kernels.int8_linear(x, q, s.float()) == 0).all()  # an all-zero row has no scale to find


def test_usable_only_for_few_bf16_cpu_rows():
    assert cpu_kernels.usable(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert not cpu_kernels.usable(torch.zeros(5, 8, dtype=torch.bfloat16))  # prefill: the GEMM
    assert not cpu_kernels.usable(torch.zeros(1, 8))  # fp32 models keep torch's kernels
    assert cpu_kernels.gemm_usable(torch.zeros(5, 16, dtype=torch.bfloat16))
    assert not cpu_kernels.gemm_usable(torch.zeros(4, 16, dtype=torch.bfloat16))  # the one-row kernels
    assert cpu_kernels.gemm_usable(torch.zeros(cpu_kernels.GEMM_MAX_ROWS, 16, dtype=torch.bfloat16))
    assert not cpu_kernels.gemm_usable(torch.zeros(cpu_kernels.GEMM_MAX_ROWS + 1, 16, dtype=torch.bfloat16))
    assert not cpu_kernels.gemm_usable(torch.zeros(5, 24, dtype=torch.bfloat16))  # whole 16-column steps only
    assert not cpu_kernels.gemm_usable(torch.zeros(5, 16, dtype=torch.bfloat16), torch.zeros(3))  # fp32 bias


# (activation rows, weight rows, columns). Fewer than 16 rows (dot-product tiles): whole 3 x 4
# tiles and every kind of edge (1-2 rows left, 1-3 weight rows left), 8192 columns. From 16 rows
# (outer-product tiles): 16 and 24 rows (a last 8-row tile), 73 (padded to 80), 129 (two blocks of
# rows), weight rows that are no multiple of 6 or that fill several chunks of 96, and 1040
# columns (two blocks of 512 and a last one of 16).
GEMM_SHAPES = [(5, 7, 32), (6, 8, 16), (7, 2049, 64), (5, 9, 8192), (16, 7, 32), (24, 200, 1040),
               (73, 30, 2048), (100, 13, 1024), (129, 97, 64)]


@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_equals_fp32_product_rounded_once(with_bias):
    g = torch.Generator().manual_seed(7)
    for rows, n, k in GEMM_SHAPES:
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(rows, k, generator=g).bfloat16()
        bias = torch.randn(n, generator=g).bfloat16() if with_bias else None
        got = cpu_kernels.gemm(x, w, bias=bias)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        torch.testing.assert_close(got.float(), _reference(x, w, bias), rtol=BF16_ULP, atol=1e-4 * k ** 0.5)
        q, s = quantize_int8(w.float())
        got = cpu_kernels.gemm(x, q, s.float(), bias)  # int8: exact in fp32, the scale on the sum
        torch.testing.assert_close(got.float(), _reference(x, dequantize_int8(q, s), bias), rtol=BF16_ULP,
                                   atol=1e-4 * k ** 0.5)


def test_gemm_rows_are_independent_and_nan_stays_in_its_row():
    w = torch.randn(12, 64).bfloat16()
    x = torch.randn(40, 64).bfloat16()
    whole = cpu_kernels.gemm(x, w)
    for r in (5, 6, 7, 8, 15, 16, 23, 31, 39):  # a row's result does not depend on its tile, or on the kernel
        torch.testing.assert_close(cpu_kernels.gemm(x[:r + 1], w)[:r + 1], whole[:r + 1], rtol=BF16_ULP, atol=1e-3)
    x[2, 7] = float("nan")
    for rows in (9, 40):  # both kernels
        got = cpu_kernels.gemm(x[:rows], w)
        assert torch.isnan(got[2]).all() and not torch.isnan(got[torch.arange(rows) != 2]).any()
    with pytest.raises(ValueError, match="16 columns"):
        cpu_kernels.gemm(torch.zeros(5, 24, dtype=torch.bfloat16), torch.zeros(3, 24, dtype=torch.bfloat16))
    for product in (cpu_kernels.gemm, cpu_kernels.bf16_linear):  # int8 values read as bf16 would be garbage
        with pytest.raises(ValueError, match="int8 one with its scales"):
            product(x[:4], torch.zeros(12, 64, dtype=torch.int8))


def test_switched_off_or_without_a_compiler(monkeypatch, tmp_path):
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setenv("CC", "false")  # a compiler that fails: a warning, then torch's kernels
        cpu_kernels.library.cache_clear()
        with pytest.warns(UserWarning, match="CPU decode kernels unavailable"):
            assert cpu_kernels.library() is None
        assert not list(tmp_path.glob("lfm2-audio/*"))  # no half-written library left behind
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
        cpu_kernels.library.cache_clear()
        assert cpu_kernels.library() is None and not cpu_kernels.usable(torch.zeros(1, 8, dtype=torch.bfloat16))
        monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(shutil, "which", lambda name: None)
        cpu_kernels.library.cache_clear()
        assert cpu_kernels.library() is None
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None


def _prefill_both(plain, engine, rows: int, seed: int):
    """One random prompt of 12 positions for `rows` rows through both models: (the generator
    for what follows, their caches, their hidden states)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(rows, 12, plain.cfg.lfm.hidden_size, generator=g).bfloat16()
    caches = [m.lfm.new_cache(rows, 32) for m in (plain, engine)]
    return g, caches, [m.lfm(prompt, c) for m, c in zip((plain, engine), caches)]


def _counted(monkeypatch, name: str) -> dict:
    """Counts the calls to cpu_kernels.<name> in calls["n"] from here on."""
    calls, kernel = {"n": 0}, getattr(cpu_kernels, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, name, counted)
    return calls


def _kernel_engine(quantize):
    """A bf16 test model (int8 with `quantize`) and the engine over it, weights unprepacked as on
    a CPU without bf16 arithmetic."""
    plain = random_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    if quantize:
        plain = quantize_model(plain, quantize)
    return plain, FastLFM2Audio(copy.deepcopy(plain), prepack=False, threads=0)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_engine_decodes_through_the_kernels(monkeypatch, quantize):
    """The bf16 engine without oneDNN prepacking (CPUs without bf16 arithmetic) and the int8
    engine run their one-row products through the kernels, and their decode steps compute the
    plain path's numbers to bf16 rounding."""
    calls = _counted(monkeypatch, "int8_linear" if quantize else "bf16_linear")
    plain, engine = _kernel_engine(quantize)
    D = plain.cfg.lfm.hidden_size
    with torch.inference_mode():
        g, caches, _ = _prefill_both(plain, engine, rows=1, seed=0)
        for step in range(6):  # the same inputs to both, one position at a time
            x = torch.randn(1, 1, D, generator=g).bfloat16()
            states = [m.lfm(x, c)[:, -1] for m, c in zip((plain, engine), caches)]
            want, got = (s.float() for s in states)
            assert F.cosine_similarity(got, want).min() > 0.999, step
            text = [m.text_logits(s).float() for m, s in zip((plain, engine), states)]
            assert F.cosine_similarity(text[1], text[0]).min() > 0.999, step
            frames = [m.sample_frame(states[0], return_logits=True) for m in (plain, engine)]
            # codebook 0 reads the same state; later ones read the codes picked before them
            first = [logits[:, 0].float() for _, logits in frames]
            assert F.cosine_similarity(first[1], first[0]).min() > 0.999, step
    assert calls["n"] > 0


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_prefill_and_batches_run_the_gemm(monkeypatch, quantize):
    """Prefill and a step of 8 rows (more than the one-row kernels take) go through the kernels'
    GEMM, as on a CPU without bf16 arithmetic, and compute the plain path's hidden states to
    bf16 rounding."""
    from lfm2_audio.model import quantize as quantize_module

    monkeypatch.setattr(quantize_module, "native_half", lambda dtype: False)
    calls = _counted(monkeypatch, "gemm")
    plain, engine = _kernel_engine(quantize)
    with torch.inference_mode():
        g, caches, (want, got) = _prefill_both(plain, engine, rows=8, seed=1)  # 96 rows a product
        assert F.cosine_similarity(got.float(), want.float(), dim=-1).min() > 0.999
        prefill_calls = calls["n"]
        x = torch.randn(8, 1, plain.cfg.lfm.hidden_size, generator=g).bfloat16()
        want, got = (m.lfm(x, c)[:, -1].float() for m, c in zip((plain, engine), caches))  # 8 rows
        assert F.cosine_similarity(got, want, dim=-1).min() > 0.999
    assert prefill_calls > 0 and calls["n"] > prefill_calls


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_depthformer_step_in_one_call_matches_the_torch_ops(quantize):
    """The codebook step as one kernel call (every layer, then the head) computes the frame the
    engine's torch ops compute: the same codes, greedy and sampled, and logits to rounding."""
    plain, engine = _kernel_engine(quantize)
    step = engine.depth.cpu_step
    assert step is not None
    h = torch.randn(3, plain.cfg.lfm.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    for rows in (1, 3):
        for params in (GREEDY, Sampling(temperature=1.0, top_k=4)):
            frames = []
            for use in (step, None):
                engine.depth.cpu_step = use
                with torch.inference_mode():
                    frames.append(engine.sample_frame(h[:rows], params, torch.Generator().manual_seed(2),
                                                      return_logits=True))
            engine.depth.cpu_step = step
            (codes, logits), (want_codes, want_logits) = frames
            assert torch.equal(codes, want_codes)
            torch.testing.assert_close(logits.float(), want_logits.float(), rtol=2 * BF16_ULP, atol=1e-2)


def test_depthformer_step_only_where_every_weight_fits_the_kernels():
    fp32 = random_model(tiny_config(), seed=0)
    assert FastLFM2Audio(copy.deepcopy(fp32), threads=0).depth.cpu_step is None  # fp32 keeps torch's ops
    bf16 = random_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    assert FastLFM2Audio(copy.deepcopy(bf16), prepack=False, exact=True, threads=0).depth.cpu_step is None
    dyn = quantize_model(copy.deepcopy(bf16), "int8-dyn")
    assert FastLFM2Audio(dyn, threads=0).depth.cpu_step is None


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_backbone_step_in_one_call_matches_the_torch_ops(quantize):
    """One new position through every backbone layer as one kernel call: the same outputs, keys,
    values and conv states as the engine's torch ops, to bf16 rounding, for one row and three."""
    plain, engine = _kernel_engine(quantize)
    step = engine.lfm.cpu_step
    assert step is not None
    D = plain.cfg.lfm.hidden_size
    g = torch.Generator().manual_seed(3)
    for rows in (1, 3):
        prompt = torch.randn(rows, 9, D, generator=g).bfloat16()
        with torch.inference_mode():
            caches = [engine.lfm.new_cache(rows, 32) for _ in range(2)]
            for cache in caches:
                engine.lfm(prompt, cache)  # prefill: torch's many-row path either way
            for position in range(9, 21):
                x = torch.randn(rows, 1, D, generator=g).bfloat16()
                outs = []
                for cache, use in zip(caches, (step, None)):
                    engine.lfm.cpu_step = use
                    outs.append(engine.lfm(x, cache).float())
                engine.lfm.cpu_step = step
                torch.testing.assert_close(outs[0], outs[1], rtol=2 * BF16_ULP, atol=2e-2)
                assert F.cosine_similarity(outs[0].flatten(1), outs[1].flatten(1)).min() > 0.9999
        got, want = caches
        assert got.max_len == want.max_len == 21 and got.lengths.tolist() == want.lengths.tolist()
        for a, b in zip(got.keys + got.values + got.conv, want.keys + want.values + want.conv):
            torch.testing.assert_close(a.float(), b.float(), rtol=2 * BF16_ULP, atol=2e-2)


def test_backbone_step_falls_back_for_rows_at_different_positions():
    model, engine = _kernel_engine(None)
    calls = {"n": 0}
    step = engine.lfm.cpu_step

    def counted(*args):
        calls["n"] += 1
        return step(*args)

    counted.state = step.state
    engine.lfm.cpu_step = counted
    D = model.cfg.lfm.hidden_size
    with torch.inference_mode():
        cache = engine.lfm.new_cache(2, 16)
        engine.lfm(torch.randn(2, 3, D).bfloat16(), cache)
        engine.lfm(torch.randn(2, 1, D).bfloat16(), cache)
        assert calls["n"] == 1
        cache.lengths[1] -= 1  # ragged rows (the serving engine's batch): torch's masked path
        engine.lfm(torch.randn(2, 1, D).bfloat16(), cache)
        assert calls["n"] == 1


def test_serving_engines_reply_through_the_kernels(tokenizer):
    """The serving engine, in a thread and in a child process (which builds its own engine and
    kernels), replies with the C steps as generate() does."""
    from test_server_engine import features, reference, run_engine, summary

    from lfm2_audio.serving.engine import Engine
    from lfm2_audio.serving.engine_process import EngineProcess
    from lfm2_audio.serving.reply import ReplyParams

    plain, engine_model = _kernel_engine("int8")
    assert engine_model.lfm.cpu_step is not None and engine_model.depth.cpu_step is not None
    turns, params = [features(plain, 0.8, 220)], ReplyParams(max_new_tokens=30)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child's count: torch's prefill GEMMs round by their blocking
    try:
        _, want = reference(engine_model, tokenizer, turns, params)
        engine = Engine(engine_model, tokenizer, max_sessions=2, max_context=512).start()
        try:
            _, got = run_engine(engine, turns, params)
        finally:
            engine.stop()
        assert summary(got[0]) == summary(want[0]) and any(e.kind == "audio" for e in got[0])
        with EngineProcess(engine_model, tokenizer, max_sessions=2, max_context=512, threads=1) as child:
            _, got = run_engine(child, turns, params)
        assert summary(got[0]) == summary(want[0])
    finally:
        torch.set_num_threads(threads)


def test_fma_peak_is_measured():
    one, two = (cpu_kernels.fma_gflops(threads, seconds=0.01, repeats=2) for threads in (1, 2))
    assert 1.0 < one and 1.0 < two  # GFLOP/s; two threads may share a core, so no ratio is promised

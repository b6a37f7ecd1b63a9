"""The fused Triton kernels of one-row decode (generation/fused.py) against the torch ops they
replace and against the plain path.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set here before the
module is first imported); the test marked `cuda` compiles them and replays them from a graph.
"""

import os
import sys

import pytest

if "lfm2_audio.generation.fused" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the fused kernels need Triton (pip install triton)")

import copy  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import tiny_config  # noqa: E402
from lfm2_audio.config import DEPTH_HEADS, DEPTH_KV_HEADS  # noqa: E402
from lfm2_audio.generation import fused  # noqa: E402
from lfm2_audio.generation.cuda_graphs import depth_step, pick  # noqa: E402
from lfm2_audio.generation.fast import FastLFM2Audio  # noqa: E402
from lfm2_audio.model.lfm2_audio import random_model  # noqa: E402

CUDA = torch.cuda.is_available()
interpreted = pytest.mark.skipif(not fused.INTERPRET, reason="kernels compiled for CUDA in this process")


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_variants_match_torch(dtype):
    """Each prologue/epilogue against the torch ops the graph path runs (K not a multiple of
    the block, N not a multiple of the rows per program)."""
    K, N = 200, 300
    x, w, res = _rand(1, K, dtype=dtype), _rand(2 * N, K, dtype=dtype, scale=0.1, seed=1), _rand(1, N, dtype=dtype, seed=2)
    g, bias = _rand(K, scale=0.5, seed=3).abs() + 0.5, _rand(N, dtype=dtype, seed=4)
    normed = F.rms_norm(x.float(), (K,), g, 1e-5).to(dtype)
    normed_hf = g.to(dtype) * F.rms_norm(x.float(), (K,), None, 1e-5).to(dtype)  # the backbone's rounding
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)  # a few bf16 steps
    cases = [
        (fused.linear(x, w[:N]), F.linear(x, w[:N])),
        (fused.linear(x, w[:N], bias=bias), F.linear(x, w[:N], bias)),
        (fused.linear(x, w[:N], norm=g, eps=1e-5), F.linear(normed, w[:N])),
        (fused.linear(x, w[:N], residual=res), res + F.linear(x, w[:N])),
        (fused.linear(x, w[:N], norm=g.to(dtype), eps=1e-5, norm_style="hf"), F.linear(normed_hf, w[:N])),
    ]
    a, b = F.linear(normed, w).chunk(2, dim=-1)
    cases.append((fused.linear(x, w, norm=g, eps=1e-5, gate=True), F.silu(a) * b))
    for got, want in cases:
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), **tol)


@interpreted
def test_pick_embed_add_takes_the_first_best_code():
    """The greedy code as torch's argmax gives it (the first of equal logits), written into a
    view of the codes, and the next slot's input z + table[code]; without a table, the code
    only; and sampled codes as the graph path's pick draws them."""
    logits = _rand(1, 2049, seed=1)
    logits[0, [700, 1500]] = 9.0
    table, z = _rand(2049, 48, seed=2), _rand(1, 48, seed=3)
    codes = torch.full((1, 8), -1, dtype=torch.long)
    out = fused.pick_embed_add(logits, codes[:, 3], table, z)
    assert codes.tolist() == [[-1, -1, -1, 700, -1, -1, -1, -1]] and logits.argmax(-1).item() == 700
    torch.testing.assert_close(out, z + table[700])
    assert fused.pick_embed_add(logits, codes[:, 7]) is None and codes[0, 7].item() == 700
    # Draws: the same code as the graph path's pick for the same noise, with and without top-k.
    temperature = torch.tensor(0.8)
    for top_k in (0, 4, 64):
        for seed in range(5):
            noise = torch.empty(1, 2049).exponential_(generator=torch.Generator().manual_seed(seed))
            fused.pick_embed_add(logits * 0.1, codes[:, 0], temperature=temperature, noise=noise, top_k=top_k)
            assert codes[0, 0] == pick(logits * 0.1, temperature, noise, top_k)[0], (top_k, seed)


@interpreted
@torch.inference_mode()
def test_layer_step_matches_graph_step():
    """Every slot of one depthformer layer: output and both caches as the graph path's
    depth_step leaves them."""
    model = random_model(tiny_config(), seed=0)
    engine = FastLFM2Audio(copy.deepcopy(model), threads=0, cuda_graphs=True, triton=False)
    depth = engine.depth
    w, fast = depth.blocks[0], depth.fast
    hd, K = depth.head_dim, depth.K
    caches = [[torch.zeros(1, DEPTH_KV_HEADS, K, hd) for _ in range(2)] for _ in range(2)]
    x = _rand(1, depth.dim, scale=2.0, seed=5)
    for k in range(K):
        slot = torch.tensor([k])
        want = depth_step(x, w, depth.eps, depth.qk_eps, *caches[0], slot, fast.cos2[k], fast.sin2[k], depth.slot_bias[k])
        got = fused.layer_step(x, w, *caches[1], k, fast.cos2[k], fast.sin2[k], depth.eps, depth.qk_eps, DEPTH_HEADS)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(caches[1], caches[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        x = want + _rand(1, depth.dim, seed=10 + k)


@interpreted
@torch.inference_mode()
def test_frames_match_plain():
    """Greedy one-row frames equal the plain path's (fp32); sampled ones are the same draw as
    the unfused graph's from the same generator."""
    plain = random_model(tiny_config(), seed=0)
    engine = FastLFM2Audio(copy.deepcopy(plain), threads=0, cuda_graphs=True, triton=True)
    unfused = FastLFM2Audio(copy.deepcopy(plain), threads=0, cuda_graphs=True, triton=False)
    assert engine.depth.fused is fused and engine.lfm.fused is fused and unfused.depth.fused is None
    for seed in range(2):
        h = _rand(1, plain.cfg.lfm.hidden_size, scale=3.0, seed=seed)
        assert torch.equal(engine.sample_frame(h), plain.sample_frame(h))
    from lfm2_audio.generation.sampling import Sampling

    params = Sampling(temperature=0.8, top_k=7)
    got = engine.sample_frame(h, params, torch.Generator().manual_seed(3))
    assert torch.equal(got, unfused.sample_frame(h, params, torch.Generator().manual_seed(3)))
    # More rows than one take the unfused graph.
    h2 = _rand(2, plain.cfg.lfm.hidden_size, scale=3.0, seed=7)
    assert torch.equal(engine.sample_frame(h2), plain.sample_frame(h2))


def test_off_cuda_needs_the_interpreter(monkeypatch):
    from lfm2_audio.generation.cuda_graphs import fused_kernels

    assert fused_kernels(torch.device("cpu"), None) is None and fused_kernels(torch.device("cpu"), False) is None
    monkeypatch.setattr(fused, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_kernels(torch.device("cpu"), True)


@pytest.mark.skipif(not CUDA or fused.INTERPRET, reason="needs CUDA with compiled (not interpreted) kernels")
@torch.inference_mode()
def test_cuda_fused_frames_match_plain():
    for dtype, need in ((torch.float32, 1.0), (torch.bfloat16, 0.9)):
        plain = random_model(tiny_config(), dtype=dtype, device="cuda", seed=0)
        engine = FastLFM2Audio(copy.deepcopy(plain), cuda_graphs=True)
        assert engine.depth.fused is fused
        g = torch.Generator().manual_seed(0)
        same = []
        for _ in range(8):
            h = (torch.randn(1, plain.cfg.lfm.hidden_size, generator=g) * 3).to(dtype).cuda()
            same.append((engine.sample_frame(h) == plain.sample_frame(h)).float().mean().item())
        assert sum(same) / len(same) >= need, (dtype, same)
        assert all(st.run.graph is not None for st in engine.depth._graphs.values())
        if dtype == torch.float32:  # a draw: the unfused graph's, from the same noise
            from lfm2_audio.generation.sampling import Sampling

            unfused = FastLFM2Audio(copy.deepcopy(plain), cuda_graphs=True, triton=False)
            for top_k in (4, None):
                params = Sampling(temperature=1.0, top_k=top_k)
                got = engine.sample_frame(h, params, torch.Generator("cuda").manual_seed(3))
                assert torch.equal(got, unfused.sample_frame(h, params, torch.Generator("cuda").manual_seed(3)))


@interpreted
@torch.inference_mode()
def test_one_row_decode_matches_plain():
    """One-row decode steps (backbone projections through the fused kernel) track the plain
    path's states, and a greedy interleaved generation gives the plain path's tokens and frames."""
    from conftest import prompted_conversation
    from lfm2_audio.generation.generate import generate

    plain = random_model(tiny_config(), seed=0)
    engine = FastLFM2Audio(copy.deepcopy(plain), threads=0, cuda_graphs=True, triton=True)
    D = plain.cfg.lfm.hidden_size
    cp, cf = plain.lfm.new_cache(1, 64), engine.lfm.new_cache(1, 64)
    x = _rand(1, 9, D, seed=1)
    plain.lfm(x, cp), engine.lfm(x, cf)
    for step in range(4):
        x = _rand(1, 1, D, seed=2 + step)
        torch.testing.assert_close(engine.lfm(x, cf), plain.lfm(x, cp), rtol=1e-4, atol=1e-5)
    assert cf.lengths.tolist() == [13]

    def items(model):
        events = generate(prompted_conversation(model), "interleaved", max_new_tokens=10)
        return [(e.kind, e.token if e.kind == "text" else tuple(e.frame.tolist())) for e in events if e.kind != "end"]

    assert items(engine) == items(plain)

"""Mimi codec: equivalence with transformers' MimiModel (oracle only), streaming == offline,
shapes, input validation and strict checkpoint loading. Small random models, float32, CPU."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from lfm2_audio.codec import MIMI_FILE
from lfm2_audio.codec.mimi import Mimi, MimiConfig
from lfm2_audio.errors import InputError

FRAME = 1920


def small_config(**kw) -> MimiConfig:
    # Same structure as the released model (ratios 8,6,5,4 -> 1920-sample frames, 2048-entry
    # codebooks, split RVQ), narrower and shallower; a short attention window so that a few
    # seconds of audio already exercise the windowed attention.
    base = dict(dimension=64, n_filters=8, num_layers=2, num_heads=4, ffn_dim=128, codebook_dim=16, n_q=8, context=6)
    base.update(kw)
    return MimiConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give layer scales, norms and codebook statistics non-trivial values (their inits are
    constants, which would hide mistakes in how they are applied)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("layer_scale_1.scale", "layer_scale_2.scale", "layer_scale.scale")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.2)
            elif re.search(r"norm\d?\.weight$|layernorm\.weight$", name):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif re.search(r"norm\d?\.bias$|layernorm\.bias$", name):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("cluster_usage"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith(("embedding_sum", "embed_sum")):
                t.copy_(torch.randn(t.shape, generator=g))
    return model


def make_mimi(config: MimiConfig | None = None, seed: int = 0) -> Mimi:
    torch.manual_seed(seed)
    return randomize_(Mimi(config or small_config()), seed).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_wave(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 24000
    tone = 0.3 * torch.sin(2 * torch.pi * 220 * t * (1 + torch.arange(batch)[:, None]))
    return (tone + 0.1 * torch.randn(batch, n, generator=g)).float()




# ---------------------------------------------------------------------------------------------
# (a) equivalence with transformers' MimiModel


def hf_to_kyutai(hf_model) -> dict:
    """Map a transformers MimiModel state dict onto Kyutai's checkpoint layout.

    HF splits q/k/v and reorders the q/k rows of each head for its rotate-half RoPE (Kyutai
    rotates interleaved pairs): HF row i pairs with row i + d/2, Kyutai row 2i with 2i + 1.
    """
    from transformers.models.mimi.modeling_mimi import MimiConvTranspose1d

    cfg = hf_model.config
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim

    def unpermute(w):  # rotate-half row order -> interleaved row order, per head
        return w.view(heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    sd = hf_model.state_dict()
    out = {}
    for key, value in sd.items():
        m = re.match(r"(encoder|decoder)\.\1_seanet\.layers\.(\d+)\.(.*)$", key)
        if m:
            side, idx, rest = m.groups()
            module = hf_model.get_submodule(f"{side}.{side}_seanet.layers.{idx}")
            if rest.startswith("block."):  # residual unit: block.{1,3}.conv.x -> block.{1,3}.conv.conv.x
                j, leaf = re.match(r"block\.(\d+)\.conv\.(\w+)$", rest).groups()
                out[f"{side}.model.{idx}.block.{j}.conv.conv.{leaf}"] = value
            elif isinstance(module, MimiConvTranspose1d):
                out[f"{side}.model.{idx}.convtr.convtr.{rest.split('.')[-1]}"] = value
            else:
                out[f"{side}.model.{idx}.conv.conv.{rest.split('.')[-1]}"] = value
            continue
        m = re.match(r"(encoder|decoder)\.\1_transformer\.layers\.(\d+)\.(.*)$", key)
        if m:
            side, n, rest = m.groups()
            prefix = f"{side}_transformer.transformer.layers.{n}."
            if rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
                continue  # fused below with q
            if rest == "self_attn.q_proj.weight":
                base = f"{side}.{side}_transformer.layers.{n}.self_attn."
                q, k, v = (sd[base + f"{p}_proj.weight"] for p in "qkv")
                out[prefix + "self_attn.in_proj_weight"] = torch.cat([unpermute(q), unpermute(k), v])
                continue
            rename = {
                "self_attn.o_proj.weight": "self_attn.out_proj.weight",
                "mlp.fc1.weight": "linear1.weight",
                "mlp.fc2.weight": "linear2.weight",
                "input_layernorm.weight": "norm1.weight",
                "input_layernorm.bias": "norm1.bias",
                "post_attention_layernorm.weight": "norm2.weight",
                "post_attention_layernorm.bias": "norm2.bias",
                "self_attn_layer_scale.scale": "layer_scale_1.scale",
                "mlp_layer_scale.scale": "layer_scale_2.scale",
            }
            out[prefix + rename[rest]] = value
            continue
        if key == "encoder.downsample.conv.weight":
            out["downsample.conv.conv.conv.weight"] = value
            continue
        if key == "decoder.upsample.conv.weight":
            out["upsample.convtr.convtr.convtr.weight"] = value
            continue
        m = re.match(r"quantizer\.(semantic|acoustic)_residual_vector_quantizer\.(.*)$", key)
        if m:
            kind, rest = m.groups()
            rvq = "rvq_first" if kind == "semantic" else "rvq_rest"
            m2 = re.match(r"layers\.(\d+)\.codebook\.(\w+)$", rest)
            if m2:
                leaf = {"initialized": "_initialized", "cluster_usage": "cluster_usage", "embed_sum": "embedding_sum"}
                out[f"quantizer.{rvq}.vq.layers.{m2.group(1)}._codebook.{leaf[m2.group(2)]}"] = value
            else:
                out[f"quantizer.{rvq}.{rest}"] = value  # input_proj / output_proj
            continue
        raise KeyError(f"unmapped transformers key {key}")
    return out


@pytest.fixture(scope="module")
def hf_pair():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MimiConfig(
        hidden_size=64,
        num_filters=8,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=8,
        upsample_groups=64,
        sliding_window=6,
    )
    torch.manual_seed(0)
    hf = transformers.MimiModel(cfg).eval()
    randomize_(hf, seed=1)
    ours = Mimi.from_state_dict(hf_to_kyutai(hf), config=small_config(context=6), num_codebooks=8)
    return hf, ours


def test_matches_transformers(hf_pair):
    hf, ours = hf_pair
    n = 11 * FRAME + 700  # not whole frames; 22 transformer steps > window of 6
    wave = make_wave(2, n)
    padded = torch.nn.functional.pad(wave, (0, -n % FRAME))
    with torch.no_grad():
        ref_codes = hf.encode(padded[:, None], num_quantizers=8).audio_codes
    codes = ours.encode(wave)
    assert codes.shape == (2, 8, 12) and codes.dtype == torch.long
    assert torch.equal(codes, ref_codes)
    assert len(set(codes[:, 1:].flatten().tolist())) > 20  # codes are not degenerate

    codes = torch.randint(0, 2048, (2, 8, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.decode(codes).audio_values[:, 0]
    audio = ours.decode(codes)
    assert audio.shape == ref.shape == (2, 13 * FRAME)
    err = rel_err(audio, ref)
    max_err = ((audio - ref).abs().max() / ref.abs().max()).item()
    print(f"HF decode rel L2 err {err:.2e}, rel max err {max_err:.2e}")
    assert err < 1e-4 and max_err < 1e-4


# ---------------------------------------------------------------------------------------------
# (b) streaming == whole sequence


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_stream_decode_matches_whole(chunk):
    mimi = make_mimi()
    T = 20  # 40 transformer steps, window 6
    codes = torch.randint(0, 2048, (2, 8, T), generator=torch.Generator().manual_seed(chunk))
    whole = mimi.decode(codes)
    stream = mimi.stream(2)
    parts = [stream.decode(codes[:, :, t : t + chunk]) for t in range(0, T, chunk)]
    assert all(p.shape[1] == FRAME * min(chunk, T - t) for p, t in zip(parts, range(0, T, chunk)))
    err = rel_err(torch.cat(parts, dim=1), whole)
    print(f"stream decode chunk={chunk}: rel err {err:.2e}")
    assert err < 1e-5


def test_stream_decode_long_default_context():
    # The released window (250 steps = 125 frames): longer than that, offline must use the same
    # banded mask as streaming or the two diverge.
    mimi = make_mimi(small_config(context=250, dimension=32, ffn_dim=64, num_layers=1))
    T = 135
    codes = torch.randint(0, 2048, (1, 8, T), generator=torch.Generator().manual_seed(5))
    whole = mimi.decode(codes)
    stream = mimi.stream(1)
    streamed = torch.cat([stream.decode(codes[:, :, t : t + 9]) for t in range(0, T, 9)], dim=1)
    err = rel_err(streamed, whole)
    print(f"stream decode T=135 context=250: rel err {err:.2e}")
    assert err < 1e-5


def test_offline_attention_is_windowed():
    # Changing codes more than the window ago must not change the output now (beyond what the
    # convolutions' short receptive field reaches).
    mimi = make_mimi()
    codes = torch.randint(0, 2048, (1, 8, 30), generator=torch.Generator().manual_seed(7))
    other = codes.clone()
    other[:, :, :5] = torch.randint(0, 2048, (1, 8, 5), generator=torch.Generator().manual_seed(8))
    a, b = mimi.decode(codes), mimi.decode(other)
    assert not torch.allclose(a[:, : 5 * FRAME], b[:, : 5 * FRAME])
    # Frames 0-4 changed: the upsampler spreads them to steps 0-11; two layers with a 6-step
    # window reach 2 * 5 = 10 steps further (21), the decoder's first conv (k7 at 25 Hz) 6 more
    # (27), the transposed convs' overlap a little into step 28 (frame 14). Nothing from frame 15
    # on may change, not even by rounding: masked keys must contribute exactly zero.
    torch.testing.assert_close(a[:, 15 * FRAME :], b[:, 15 * FRAME :], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9 * FRAME : 10 * FRAME], b[:, 9 * FRAME : 10 * FRAME])


def test_long_offline_is_chunked_consistently():
    # decode()/encode() split inputs longer than offline_chunk_frames; the result must not change.
    mimi = make_mimi()
    codes = torch.randint(0, 2048, (1, 8, 11), generator=torch.Generator().manual_seed(9))
    wave = make_wave(1, 11 * FRAME - 5)
    whole_audio, whole_codes = mimi.decode(codes), mimi.encode(wave)
    mimi.offline_chunk_frames = 4
    assert rel_err(mimi.decode(codes), whole_audio) < 1e-5
    assert torch.equal(mimi.encode(wave), whole_codes)


@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_encode_matches_whole(chunk):
    mimi = make_mimi()
    T = 14
    wave = make_wave(2, T * FRAME, seed=chunk)
    whole = mimi.encode(wave)
    enc = mimi.stream_encoder(2)
    streamed = torch.cat([enc.encode(wave[:, t * FRAME : (t + chunk) * FRAME]) for t in range(0, T, chunk)], dim=2)
    assert torch.equal(streamed, whole)


# ---------------------------------------------------------------------------------------------
# (c) shapes and interface


def test_interface_and_lengths():
    mimi = make_mimi()
    assert (mimi.sample_rate, mimi.frame_samples, mimi.num_codebooks, mimi.can_encode) == (24000, 1920, 8, True)
    for T in (0, 1, 5):
        out = mimi.decode(torch.zeros(1, 8, T, dtype=torch.long))
        assert out.shape == (1, FRAME * T) and out.dtype == torch.float32
    assert mimi.decode(torch.zeros(8, 2, dtype=torch.long)).shape == (1, 2 * FRAME)  # [K, T] accepted
    for n, frames in ((1, 1), (1920, 1), (1921, 2), (5 * 1920, 5)):
        assert mimi.encode(torch.zeros(1, n)).shape == (1, 8, frames)
    assert mimi.encode(torch.zeros(3, 1, 100)).shape == (3, 8, 1)


def test_official_size_count():
    # Built on the meta device: shapes only, no memory.
    with torch.device("meta"):
        mimi = Mimi(MimiConfig())
    sd = mimi.state_dict()
    assert sum(v.numel() for v in sd.values()) == 96_151_393
    assert sd["encoder_transformer.transformer.layers.3.self_attn.in_proj_weight"].shape == (1536, 512)
    assert sd["decoder.model.2.convtr.convtr.weight"].shape == (1024, 512, 16)
    assert sd["downsample.conv.conv.conv.weight"].shape == (512, 512, 4)
    assert sd["upsample.convtr.convtr.convtr.weight"].shape == (512, 1, 4)
    assert sd["quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum"].shape == (2048, 256)
    assert "quantizer.rvq_first.vq.layers.0._codebook._initialized" in sd


# ---------------------------------------------------------------------------------------------
# (d) bad input


def test_bad_codes():
    mimi = make_mimi()
    good = torch.randint(0, 2048, (1, 8, 4))
    bad = good.clone()
    bad[0, 3, 2] = 2049
    with pytest.raises(InputError, match="2049"):
        mimi.decode(bad)
    bad[0, 3, 2] = -1
    with pytest.raises(InputError):
        mimi.decode(bad)
    bad = good.clone()
    bad[0, 5, 1] = 2048  # end-of-audio code outside codebook 0 is just out of range
    with pytest.raises(InputError):
        mimi.decode(bad)
    with pytest.raises(InputError, match="codebooks"):
        mimi.decode(good[:, :7])
    with pytest.raises(InputError, match="integers"):
        mimi.decode(good.float())
    with pytest.raises(InputError):
        mimi.stream(2).decode(good)  # batch 1 into a batch-2 stream


def test_end_of_audio_trimmed():
    mimi = make_mimi()
    codes = torch.randint(0, 2048, (1, 8, 6))
    with_eoa = codes.clone()
    with_eoa[0, 0, 4] = 2048
    with_eoa[0, 1:, 4:] = 0
    out = mimi.decode(with_eoa)
    assert out.shape == (1, 4 * FRAME)
    torch.testing.assert_close(out, mimi.decode(codes[:, :, :4]))


def test_bad_audio():
    mimi = make_mimi()
    with pytest.raises(InputError):
        mimi.encode(torch.zeros(1, 1920, dtype=torch.int16))
    with pytest.raises(InputError):
        mimi.encode(torch.zeros(1, 2, 1920))  # stereo
    with pytest.raises(InputError):
        mimi.encode(torch.full((1, 1920), float("nan")))
    with pytest.raises(InputError):
        mimi.stream_encoder(1).encode(torch.zeros(1, 1000))  # not whole frames
    with pytest.raises(InputError):
        mimi.num_codebooks = 40


# ---------------------------------------------------------------------------------------------
# (e) strict loading


def test_strict_loading(tmp_path):
    cfg = small_config()
    mimi = make_mimi(cfg)
    sd = {k: v.contiguous() for k, v in mimi.state_dict().items()}
    path = tmp_path / MIMI_FILE
    save_file(sd, str(path))
    loaded = Mimi.from_pretrained(tmp_path, config=cfg)  # a directory holding the file
    codes = torch.randint(0, 2048, (1, 8, 3))
    torch.testing.assert_close(loaded.decode(codes), mimi.decode(codes), rtol=0, atol=0)

    key = "decoder_transformer.transformer.layers.1.linear2.weight"
    missing = dict(sd)
    del missing[key]
    save_file(missing, str(path))
    with pytest.raises(InputError, match=re.escape(key)):
        Mimi.from_pretrained(path, config=cfg)

    key = "quantizer.rvq_rest.vq.layers.2._codebook.embedding_sum"
    misshapen = dict(sd)
    misshapen[key] = torch.zeros(2048, 17)
    save_file(misshapen, str(path))
    with pytest.raises(InputError, match=re.escape(key)):
        Mimi.from_pretrained(path, config=cfg)

    extra = dict(sd, **{"decoder.model.99.conv.conv.weight": torch.zeros(1)})
    save_file(extra, str(path))
    with pytest.raises(InputError, match=re.escape("decoder.model.99.conv.conv.weight")):
        Mimi.from_pretrained(path, config=cfg)

    with pytest.raises(InputError):
        Mimi.from_pretrained(tmp_path / "nowhere.safetensors", config=cfg)


def test_old_aliases_load(tmp_path):
    cfg = small_config()
    mimi = make_mimi(cfg)
    old = {}
    for k, v in mimi.state_dict().items():
        k = k.replace("._codebook.cluster_usage", "._codebook.cluster_size")
        k = k.replace("._codebook.embedding_sum", "._codebook.embed_avg")
        k = k.replace("._codebook._initialized", "._codebook.inited")
        k = k.replace(".self_attn.in_proj_weight", ".self_attn.in_projs.0.weight")
        k = k.replace(".self_attn.out_proj.weight", ".self_attn.out_projs.0.weight")
        old[k] = v.contiguous()
    save_file(old, str(tmp_path / "old.safetensors"))
    loaded = Mimi.from_pretrained(tmp_path / "old.safetensors", config=cfg)
    codes = torch.randint(0, 2048, (1, 8, 3))
    torch.testing.assert_close(loaded.decode(codes), mimi.decode(codes), rtol=0, atol=0)

"""LFM2.5 audio detokenizer: lengths, streaming == whole decode, the attention window, the
ISTFT, strict loading and input checks. Random weights at a small size."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lfm2_audio.codec.detokenizer import Detokenizer
from lfm2_audio.config import END_OF_AUDIO, Lfm2Config
from lfm2_audio.errors import InputError

SMALL = dict(
    vocab_size=16,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=192,
    block_multiple_of=32,
    layer_types=["conv", "sliding_attention", "conv", "sliding_attention"],
    sliding_window=30,
)

OFFICIAL = dict(
    vocab_size=65536,
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    intermediate_size=3328,
    layer_types=["conv", "conv", "sliding_attention", "conv", "sliding_attention", "conv", "sliding_attention", "conv"],
    sliding_window=30,
    output_size=1282,
    conv_L_cache=3,
    rope_theta=1000000.0,
    norm_eps=1e-5,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Detokenizer(Lfm2Config.from_dict(SMALL)).eval()
    # Spread the spectrum a little so the audio is not all tiny random-phase noise.
    with torch.no_grad():
        m.lin.weight.mul_(3)
    return m


def rand_codes(b, t, seed=1):
    return torch.randint(0, 2048, (b, 8, t), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_interface(model):
    assert (model.sample_rate, model.frame_samples, model.num_codebooks) == (24000, 1920, 8)
    assert model.can_encode is False
    with pytest.raises(InputError, match="cannot encode"):
        model.encode(torch.zeros(1, 1920))


@pytest.mark.parametrize("t", [1, 2, 7, 31])
def test_output_length(model, t):
    y = model.decode(rand_codes(2, t))
    assert y.shape == (2, 1920 * t) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert model.decode(rand_codes(1, t)[0]).shape == (1, 1920 * t)  # [8, T] works too


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_streaming_equals_whole(model, chunk):
    T = 20  # 120 steps: far past the 30-step window
    codes = rand_codes(2, T)
    whole = model.decode(codes)
    stream = model.stream(2)
    outs = [stream.decode(codes[:, :, i : i + chunk]) for i in range(0, T, chunk)]
    outs.append(stream.flush())
    # Exactly the final samples per call: the last 480 of the newest frame wait for the next.
    assert [o.shape[1] for o in outs[:2]] == [1920 * chunk - 480, 1920 * min(chunk, T - chunk)]
    assert outs[-1].shape == (2, 480)
    assert rel_err(torch.cat(outs, dim=1), whole) < 1e-5
    # flush() starts a new utterance on the same stream.
    again = torch.cat([stream.decode(codes[:, :, :4]), stream.flush()], dim=1)
    assert rel_err(again, model.decode(codes[:, :, :4])) < 1e-5


def test_long_decode_uses_streaming_path(model):
    codes = rand_codes(1, 23)
    dense = model.decode(codes)
    model.dense_max_frames = 4
    try:
        chunked = model.decode(codes)
    finally:
        model.dense_max_frames = Detokenizer.dense_max_frames
    assert chunked.shape == dense.shape and rel_err(chunked, dense) < 1e-5


def test_window_limits_attention(model):
    # The last frame's audio uses steps >= 6(T-1) - 2 (ISTFT overlap); each step sees 2 steps
    # back per conv layer and 29 per attention layer: 2*2 + 2*29 = 62 here. So frames whose 6
    # steps all lie before 6(T-1) - 2 - 62 cannot touch it: frames 0..7 for T = 20.
    T = 20
    codes = rand_codes(1, T, seed=5)
    last = model.decode(codes)[:, -1920:]

    def changed(frame):
        c = codes.clone()
        c[:, :, frame] = (c[:, :, frame] + 777) % 2048
        return rel_err(model.decode(c)[:, -1920:], last)

    assert changed(0) == 0.0 and changed(7) == 0.0
    assert changed(8) > 0  # the one path at the edge of every layer's reach
    assert changed(T - 2) > 1e-3
    model.window = 10**6  # without the window the first frame does reach the end
    try:
        assert changed(0) > 1e-3
    finally:
        model.window = 30


def test_istft_inverts_stft(model):
    istft = model.istft
    torch.manual_seed(3)
    x = torch.randn(2, 320 * 17)
    spec = torch.stft(x, 1280, 320, window=istft.window, center=True, return_complex=True)
    y = istft(spec.transpose(1, 2))  # N = 18 frames -> 18 * 320 samples
    assert y.shape == (2, 320 * 18)
    # 'same' padding trims 480 where center=True pads 640: the signal sits 160 samples in.
    assert (y[:, 160 : 160 + x.shape[1]] - x).abs().max() < 1e-5
    # An arbitrary (inconsistent) spectrum: same as torch.istft, up to that shift.
    s = torch.randn(2, 641, 12, dtype=torch.complex64)
    ref = torch.istft(s, 1280, 320, window=istft.window, center=True)
    ours = istft(s.transpose(1, 2))
    assert (ours[:, 160 : 160 + ref.shape[1] - 160] - ref[:, :-160]).abs().max() < 1e-5


def save_checkpoint(path, model, cfg=SMALL, drop=None, add=None, reshape=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    if reshape:
        state[reshape] = torch.zeros(7, 7)
    save_file(state, str(path / "model.safetensors"))
    return path


def test_load_roundtrip(model, tmp_path):
    loaded = Detokenizer.from_pretrained(save_checkpoint(tmp_path / "ok", model))
    codes = rand_codes(1, 5)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert loaded.lin.weight.dtype == torch.float32 and loaded.window == 30


def test_load_is_strict(model, tmp_path):
    with pytest.raises(InputError, match=r"missing tensors: lfm\.layers\.1\.self_attn\.k_proj\.weight"):
        Detokenizer.from_pretrained(save_checkpoint(tmp_path / "a", model, drop="lfm.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(InputError, match=r"missing tensors: lfm\.embed_tokens\.weight"):
        Detokenizer.from_pretrained(save_checkpoint(tmp_path / "b", model, drop="lfm.embed_tokens.weight"))
    with pytest.raises(InputError, match=r"unexpected tensors: lfm\.rotary_emb\.inv_freq"):
        Detokenizer.from_pretrained(save_checkpoint(tmp_path / "c", model, add="lfm.rotary_emb.inv_freq"))
    with pytest.raises(InputError, match=r"misshapen tensors: lin\.bias: file \(7, 7\)"):
        Detokenizer.from_pretrained(save_checkpoint(tmp_path / "d", model, reshape="lin.bias"))
    with pytest.raises(InputError, match="misshapen"):  # config and weights disagree
        Detokenizer.from_pretrained(save_checkpoint(tmp_path / "e", model, cfg={**SMALL, "hidden_size": 32}))
    with pytest.raises(InputError, match="config.json"):
        Detokenizer.from_pretrained(tmp_path / "nowhere")
    bad = save_checkpoint(tmp_path / "f", model)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="safetensors"):
        Detokenizer.from_pretrained(bad)


def test_bad_codes(model):
    codes = rand_codes(1, 4)
    for value in (2049, -1, 5000):
        c = codes.clone()
        c[0, 3, 1] = value
        with pytest.raises(InputError):
            model.decode(c)
    with pytest.raises(InputError):
        model.decode(codes.float())
    with pytest.raises(InputError):
        model.decode(codes[:, :7])
    with pytest.raises(InputError):
        model.stream(2).decode(codes)  # wrong batch for this stream
    with pytest.raises(InputError):
        model.stream(0)


def test_end_of_audio_is_trimmed(model):
    codes = rand_codes(1, 6)
    codes[0, 0, 4] = END_OF_AUDIO
    assert model.decode(codes).shape == (1, 1920 * 4)
    stream = model.stream(1)
    outs = [stream.decode(codes[:, :, i : i + 1]) for i in range(6)]
    outs.append(stream.flush())
    assert rel_err(torch.cat(outs, dim=1), model.decode(codes)) < 1e-5
    assert torch.cat(outs, dim=1).shape == (1, 1920 * 4)


def test_official_size_parameters():
    cfg = Lfm2Config.from_dict(OFFICIAL)
    assert cfg.ffn_dim == 2304
    with torch.device("meta"):
        m = Detokenizer(cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["emb.emb.weight"] == (16384, 512)
    assert shapes["lfm.embed_tokens.weight"] == (65536, 512)
    assert shapes["lin.weight"] == (1282, 512) and shapes["istft.window"] == (1280,)
    assert shapes["lfm.layers.2.self_attn.k_proj.weight"] == (256, 512)
    assert shapes["lfm.layers.0.conv.conv.weight"] == (512, 1, 3)
    live = sum(p.numel() for k, p in m.named_parameters() if not k.startswith("lfm.embed_tokens"))
    assert live == 44_976_578  # spec: ~44.98 M

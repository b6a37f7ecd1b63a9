import io

import numpy as np
import pytest
import soundfile as sf
import torch

from lfm2_audio.audio.io import load_audio, prepare_waveform, resample, save_wav
from lfm2_audio.errors import InputError


def _sine(freq, rate, seconds=1.0, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * rate / len(x)


def test_mono_float_passthrough():
    x = _sine(440, 16000)
    y = prepare_waveform(x, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(x, y)


def test_stereo_is_mixed_to_mono_in_both_layouts():
    left, right = _sine(440, 16000), _sine(880, 16000, amp=0.25)
    expected = (left + right) / 2
    np.testing.assert_allclose(prepare_waveform(np.stack([left, right], 1), 16000), expected, atol=1e-7)
    np.testing.assert_allclose(prepare_waveform(np.stack([left, right], 0), 16000), expected, atol=1e-7)
    np.testing.assert_allclose(prepare_waveform(torch.from_numpy(np.stack([left, right])), 16000), expected, atol=1e-7)
    with pytest.raises(InputError, match="channels"):
        prepare_waveform(np.ones((100, 100), np.float32), 16000)
    with pytest.raises(InputError):
        prepare_waveform(np.ones((2, 3, 100), np.float32), 16000)


def test_integer_pcm_conversion():
    pcm16 = np.array([0, 16384, -32768, 32767], np.int16)
    np.testing.assert_allclose(prepare_waveform(pcm16, 16000), [0, 0.5, -1, 32767 / 32768])
    pcm32 = np.array([0, 2**30, -(2**31)], np.int32)
    np.testing.assert_allclose(prepare_waveform(pcm32, 16000), [0, 0.5, -1])
    u8 = np.array([128, 192, 0], np.uint8)
    np.testing.assert_allclose(prepare_waveform(u8, 16000), [0, 0.5, -1])
    assert prepare_waveform(torch.tensor([0.5, -0.5], dtype=torch.bfloat16), 16000).dtype == np.float32


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_length_and_pitch(rate):
    x = _sine(1000, rate, seconds=1.0)
    y = prepare_waveform(x, rate)
    assert y.dtype == np.float32
    assert abs(len(y) - 16000) <= 1
    assert _peak_hz(y, 16000) == pytest.approx(1000, abs=2)
    assert np.max(np.abs(y)) == pytest.approx(0.5, abs=0.02)


def test_resample_helper():
    x = _sine(300, 24000, 0.5)
    assert resample(x, 24000, 24000) is not None and len(resample(x, 24000, 24000)) == len(x)
    assert len(resample(x, 24000, 16000)) == 8000
    assert len(prepare_waveform(_sine(300, 16000), 16000, target_rate=24000)) == 24000


def test_rejects_bad_samples():
    x = _sine(440, 16000)
    x[5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        prepare_waveform(x, 16000)
    x[5] = np.inf
    with pytest.raises(InputError, match="infinite"):
        prepare_waveform(x, 16000)
    with pytest.raises(InputError, match="empty"):
        prepare_waveform(np.zeros(0, np.float32), 16000)
    with pytest.raises(InputError, match="silent"):
        prepare_waveform(np.zeros(16000, np.float32), 16000)
    with pytest.raises(InputError, match="silent"):
        prepare_waveform(np.zeros(16000, np.int16), 44100)
    with pytest.raises(InputError, match="sample type"):
        prepare_waveform(np.ones(100, np.complex64), 16000)


@pytest.mark.parametrize("rate", [0, -16000, 16000.5, 500, 10**6, "16000", None, True])
def test_rejects_bad_rates(rate):
    with pytest.raises(InputError, match="rate"):
        prepare_waveform(_sine(440, 16000), rate)


def test_accepts_integral_rates():
    x = _sine(440, 16000)
    assert len(prepare_waveform(x, 16000.0)) == 16000
    assert len(prepare_waveform(x, np.int64(16000))) == 16000


def test_load_from_path_bytes_and_file(tmp_path):
    x = np.stack([_sine(440, 22050, 0.5), _sine(440, 22050, 0.5)], 1)
    path = tmp_path / "a.wav"
    sf.write(path, x, 22050, subtype="PCM_16")
    from_path = load_audio(path)
    assert from_path.dtype == np.float32 and abs(len(from_path) - 8000) <= 1
    np.testing.assert_array_equal(load_audio(str(path)), from_path)
    raw = path.read_bytes()
    np.testing.assert_array_equal(load_audio(raw), from_path)
    np.testing.assert_array_equal(load_audio(io.BytesIO(raw)), from_path)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), from_path)
    assert abs(len(load_audio(path, target_rate=24000)) - 12000) <= 1
    load_audio(path, sample_rate=22050)
    with pytest.raises(InputError, match="22050"):
        load_audio(path, sample_rate=16000)


def test_load_array_needs_rate():
    with pytest.raises(InputError, match="sample_rate"):
        load_audio(_sine(440, 16000))
    assert len(load_audio(_sine(440, 8000), sample_rate=8000)) == 16000


def test_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(InputError, match="bad.wav"):
        load_audio(bad)
    with pytest.raises(InputError, match="cannot read"):
        load_audio(b"garbage bytes" * 10)
    with pytest.raises(InputError, match="empty"):
        load_audio(b"")
    with pytest.raises(InputError):
        load_audio(12345)


def test_silent_file_rejected(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000, np.float32), 16000)
    with pytest.raises(InputError, match="silent"):
        load_audio(path)


def test_save_wav_roundtrip(tmp_path):
    x = _sine(440, 24000, 0.25)
    path = tmp_path / "out.wav"
    save_wav(path, x, 24000)
    y, rate = sf.read(path, dtype="float32")
    assert rate == 24000 and sf.info(path).subtype == "PCM_16"
    np.testing.assert_allclose(y, x, atol=1 / 32768 + 1e-6)
    buf = io.BytesIO()
    save_wav(buf, torch.from_numpy(x * 3), 24000, subtype="FLOAT")  # out of range kept in float
    buf.seek(0)
    y, _ = sf.read(buf, dtype="float32")
    np.testing.assert_allclose(y, x * 3)
    save_wav(path, x * 3, 24000)  # clipped, not wrapped, in PCM
    y, _ = sf.read(path, dtype="float32")
    assert y.max() == pytest.approx(1.0, abs=1e-4) and y.min() == pytest.approx(-1.0, abs=1e-4)

"""Audio in and out: files, bytes and arrays -> clean mono float32 at the model's rate."""

from __future__ import annotations

import io
import numbers
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from ..errors import InputError

MIN_RATE, MAX_RATE = 1000, 384000
MAX_CHANNELS = 8  # a [C, N] array is only taken as channels-first when C is this small


def _check_rate(rate, name: str = "sample_rate") -> int:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise InputError(f"{name} must be a positive integer in Hz, got {rate!r}")
    if isinstance(rate, numbers.Integral):
        value = int(rate)
    elif float(rate).is_integer():
        value = int(rate)
    else:
        raise InputError(f"{name} must be a whole number of Hz, got {rate!r}")
    if not MIN_RATE <= value <= MAX_RATE:
        raise InputError(f"{name} {value} Hz is out of range ({MIN_RATE}..{MAX_RATE} Hz)")
    return value


def _to_numpy(wave) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu()
        if wave.dtype in (torch.bfloat16, torch.float16):
            wave = wave.float()  # numpy has no bfloat16
        return wave.numpy()
    if isinstance(wave, (list, tuple)):
        return np.asarray(wave, dtype=np.float32)
    if isinstance(wave, np.ndarray):
        return wave
    raise InputError(f"expected audio samples as a numpy array or torch tensor, got {type(wave).__name__}")


def _to_float(a: np.ndarray) -> np.ndarray:
    # Integer PCM is scaled to [-1, 1) by its full-scale value.
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if a.dtype == np.int32:
        return (a.astype(np.float64) / 2.0**31).astype(np.float32)
    if a.dtype == np.uint8:
        return (a.astype(np.float32) - 128.0) / 128.0
    if a.dtype == np.int8:
        return a.astype(np.float32) / 128.0
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    raise InputError(
        f"unsupported sample type {a.dtype}: use float, int16, int32 or uint8 PCM samples"
    )


def _to_mono(a: np.ndarray) -> np.ndarray:
    if a.ndim == 1:
        return a
    if a.ndim != 2:
        raise InputError(f"audio must be 1-D or 2-D (samples x channels), got shape {a.shape}")
    n0, n1 = a.shape
    if n1 <= MAX_CHANNELS and n1 < n0:  # [N, C], as soundfile returns
        return a.mean(axis=1, dtype=np.float32)
    if n0 <= MAX_CHANNELS and n0 < n1:  # [C, N], as torchaudio returns
        return a.mean(axis=0, dtype=np.float32)
    raise InputError(
        f"cannot tell samples from channels in audio of shape {a.shape}: "
        f"expected [samples, channels] or [channels, samples] with at most {MAX_CHANNELS} channels"
    )


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a mono float waveform (soxr, high quality). Returns float32 1-D."""
    from_rate = _check_rate(from_rate, "from_rate")
    to_rate = _check_rate(to_rate, "to_rate")
    if from_rate == to_rate:
        return np.array(wave, dtype=np.float32)  # a copy: callers may modify the result
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    return np.ascontiguousarray(soxr.resample(wave, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def prepare_waveform(wave, sample_rate: int, target_rate: int = 16000) -> np.ndarray:
    """Samples (array/tensor, any PCM type, mono or multi-channel) -> mono float32 at target_rate."""
    sample_rate = _check_rate(sample_rate)
    target_rate = _check_rate(target_rate, "target_rate")
    a = _to_numpy(wave)
    if a.dtype.kind == "c" or a.dtype == np.bool_:
        raise InputError(f"unsupported sample type {a.dtype}")
    if a.size == 0:
        raise InputError("audio is empty (no samples)")
    a = _to_mono(_to_float(a))
    if not np.isfinite(a).all():
        raise InputError("audio contains NaN or infinite samples")
    if not np.any(a):
        raise InputError("audio is silent: every sample is zero")
    return resample(a, sample_rate, target_rate)


def _read(source) -> tuple[np.ndarray, int]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InputError("audio is empty (zero bytes)")
        source, name = io.BytesIO(bytes(source)), "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        if not Path(source).is_file():
            raise InputError(f"audio file not found: {name}")
    elif hasattr(source, "read"):
        name = getattr(source, "name", "<file object>")
    else:
        raise InputError(f"cannot read audio from {type(source).__name__}")
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"cannot read audio {name}: {e}") from None
    return data, rate


def load_audio(source, sample_rate: int | None = None, target_rate: int = 16000) -> np.ndarray:
    """Audio from a path, bytes, a file object, or an array/tensor -> mono float32 at target_rate.

    Files carry their own rate (sample_rate, if given, must agree); arrays and tensors need
    sample_rate.
    """
    if isinstance(source, (np.ndarray, torch.Tensor, list, tuple)):
        if sample_rate is None:
            raise InputError("sample_rate is required when audio is given as an array")
        return prepare_waveform(source, sample_rate, target_rate)
    data, rate = _read(source)
    if sample_rate is not None and _check_rate(sample_rate) != rate:
        raise InputError(f"sample_rate={sample_rate} given, but the file is {rate} Hz")
    # A file's layout is known ([frames, channels]), so mix here rather than guess later.
    return prepare_waveform(data.mean(axis=1, dtype=np.float32), rate, target_rate)


def save_wav(path, wave, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write a WAV file (path or binary file object). wave: float [N] or [N, C] in [-1, 1]."""
    sample_rate = _check_rate(sample_rate)
    a = _to_float(_to_numpy(wave))
    if a.ndim not in (1, 2) or a.size == 0:
        raise InputError(f"cannot save audio of shape {a.shape}")
    if subtype.upper().startswith("PCM"):
        a = np.clip(a, -1.0, 1.0)  # libsndfile would wrap out-of-range values around
    try:
        sf.write(path, a, sample_rate, subtype=subtype, format="WAV")
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"cannot write audio to {path}: {e}") from None

"""Log-mel front end: the NeMo-style FilterbankFeatures the checkpoints were trained with.

Reproduces the reference numerics in float32 (spec §6.1): pre-emphasis, centred STFT with a
symmetric Hann window, power spectrum, Slaney mel filterbank, natural log, per-feature
normalisation over the valid frames, and a zeroed terminal frame. No dither: the reference
front end always runs in eval mode.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..config import PreprocessorConfig
from ..errors import InputError

PREEMPH = 0.97
LOG_GUARD = 2.0**-24  # added before the log so silent bins stay finite
NORM_EPS = 1e-5  # added to the std so constant features do not divide by zero


# --- Slaney mel scale (the "auditory toolbox" scale librosa uses when htk=False) ------------
# Linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Hz -> mel on the Slaney scale."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log, lin)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    """mel -> Hz on the Slaney scale (inverse of `hz_to_mel`)."""
    m = np.asarray(m, dtype=np.float64)
    lin = m * _F_SP
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log, lin)


@functools.lru_cache(maxsize=8)
def _filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fft_hz = np.arange(n_fft // 2 + 1, dtype=np.float64) * (sample_rate / n_fft)
    # n_mels triangles need n_mels + 2 edges, equally spaced in mel.
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    # The triangles are rounded to float32 before the area normalisation is applied, as in
    # the reference, so the float32 result matches it bit for bit.
    tri = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    # Slaney normalisation: each triangle gets unit area in Hz (height 2 / bandwidth).
    enorm = 2.0 / (edges[2:] - edges[:-2])
    fb = (tri * enorm[:, None]).astype(np.float32)
    fb.flags.writeable = False
    return fb


def mel_filterbank(cfg: PreprocessorConfig | None = None) -> np.ndarray:
    """Slaney-normalised mel filterbank [n_mels, n_fft // 2 + 1] float32, fmin 0, fmax sr / 2.

    Equal to librosa.filters.mel(sr, n_fft, n_mels, htk=False, norm="slaney").
    """
    cfg = cfg or PreprocessorConfig()
    return _filterbank(cfg.sample_rate, cfg.n_fft, cfg.features, 0.0, cfg.sample_rate / 2).copy()


@functools.lru_cache(maxsize=8)
def _filterbank_tensor(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    return torch.tensor(_filterbank(sample_rate, n_fft, n_mels, 0.0, sample_rate / 2))


@functools.lru_cache(maxsize=8)
def _window(win_length: int) -> torch.Tensor:
    return torch.hann_window(win_length, periodic=False, dtype=torch.float32)


def num_frames(num_samples: int, cfg: PreprocessorConfig | None = None) -> int:
    """Frames the front end returns for a clip of `num_samples`: 1 + L // hop (terminal included)."""
    cfg = cfg or PreprocessorConfig()
    return 1 + num_samples // cfg.hop_length


def _num_valid(num_samples: int, cfg: PreprocessorConfig) -> int:
    # Frames counted as if padded by n_fft // 2 each side: floor((L + 2 * (n_fft // 2) - n_fft) / hop).
    return (num_samples + 2 * (cfg.n_fft // 2) - cfg.n_fft) // cfg.hop_length


def _as_wave(wave) -> torch.Tensor:
    if isinstance(wave, np.ndarray):
        wave = torch.tensor(wave)  # a copy; also fine for read-only arrays
    if not isinstance(wave, torch.Tensor):
        raise InputError(f"waveform must be a torch.Tensor or numpy array, got {type(wave).__name__}")
    if wave.dim() != 1:
        raise InputError(f"waveform must be 1-D mono samples, got shape {tuple(wave.shape)}")
    if not wave.is_floating_point():
        raise InputError(f"waveform must be floating point (use audio.prepare_waveform), got {wave.dtype}")
    return wave.detach().to(torch.float32)


def _check_cfg(cfg: PreprocessorConfig) -> None:
    if cfg.hop_length <= 0 or not 0 < cfg.win_length <= cfg.n_fft:
        raise InputError(
            f"preprocessor: need 0 < win_length ({cfg.win_length}) <= n_fft ({cfg.n_fft}) and hop > 0"
        )


def _features(x: torch.Tensor, lengths: torch.Tensor, cfg: PreprocessorConfig) -> torch.Tensor:
    """Batched core: x [B, N] zero-padded float32, lengths [B] -> [B, n_mels, 1 + N // hop]."""
    hop, n_fft = cfg.hop_length, cfg.n_fft
    valid = _num_valid(lengths, cfg)

    sample_idx = torch.arange(x.shape[1], device=x.device)
    x = torch.cat([x[:, :1], x[:, 1:] - PREEMPH * x[:, :-1]], dim=1)
    x = x.masked_fill(sample_idx[None, :] >= lengths[:, None], 0.0)

    spec = torch.stft(
        x,
        n_fft=n_fft,
        hop_length=hop,
        win_length=cfg.win_length,
        window=_window(cfg.win_length).to(x.device),
        center=True,
        pad_mode="constant",
        onesided=True,
        return_complex=True,
    )
    spec = torch.view_as_real(spec)
    # Magnitude then squared (not re^2 + im^2 directly) to follow the reference's rounding.
    power = torch.sqrt(spec.pow(2).sum(-1)).pow(2)

    fb = _filterbank_tensor(cfg.sample_rate, n_fft, cfg.features).to(x.device)
    feats = torch.log(torch.matmul(fb, power) + LOG_GUARD)

    # Per-feature normalisation, statistics over the valid frames only.
    frame_idx = torch.arange(feats.shape[-1], device=x.device)
    mask = (frame_idx[None, :] < valid[:, None])[:, None, :]  # [B, 1, T]
    count = valid.to(torch.float32)[:, None]
    mean = torch.where(mask, feats, 0.0).sum(-1) / count
    dev = torch.where(mask, feats - mean[..., None], 0.0)
    std = torch.sqrt(dev.pow(2).sum(-1) / (count - 1.0))
    std = torch.nan_to_num(std, nan=0.0) + NORM_EPS
    feats = (feats - mean[..., None]) / std[..., None]
    return feats.masked_fill(~mask, cfg.pad_value)


def log_mel(wave, cfg: PreprocessorConfig | None = None) -> tuple[torch.Tensor, int]:
    """Log-mel features of one 16 kHz mono clip.

    Returns ([n_mels, T] float32 with T = 1 + L // hop, valid = L // hop). The last frame
    (t >= valid) is pad_value: inference feeds all T frames, as the reference does.
    """
    cfg = cfg or PreprocessorConfig()
    _check_cfg(cfg)
    x = _as_wave(wave)
    n = x.shape[0]
    valid = _num_valid(n, cfg)
    if valid < 2:
        raise InputError(
            f"audio too short: {n} samples gives {valid} feature frame(s); "
            f"need at least {2 * cfg.hop_length} samples ({2 * cfg.window_stride * 1000:.0f} ms at "
            f"{cfg.sample_rate} Hz)"
        )
    if not torch.isfinite(x).all():
        raise InputError("waveform contains NaN or infinite samples")
    with torch.no_grad():
        feats = _features(x[None], torch.tensor([n], device=x.device), cfg)[0]
    return feats, valid


def trim_silence(wave: np.ndarray, rate: int, lead_s: float = 0.01, trail_s: float = 0.08,
                 min_cut_s: float = 0.1, frame_s: float = 0.01) -> np.ndarray:
    """Leading silence cut to `lead_s` and trailing silence to `trail_s`, digital or a steady
    noise floor; an end is left alone unless at least `min_cut_s` would go.

    A 10 ms frame counts as sound when its peak passes twice the floor (the 10th percentile of
    the frames' peaks, at least 2e-3: the level the demo's training clips were trimmed at),
    capped 20 dB under the loudest frame so a noisy clip still keeps its speech. Pauses inside
    stay; a clip with nothing above the threshold comes back whole. The defaults match the demo
    model's training clips, which start with the speech and keep <= 80 ms after it.
    """
    hop = max(1, int(frame_s * rate))
    n = len(wave) // hop
    if n < 3:
        return wave
    peaks = np.abs(wave[: n * hop]).reshape(n, hop).max(axis=1)
    threshold = min(max(2e-3, 2.0 * float(np.percentile(peaks, 10))), 0.1 * float(peaks.max()))
    loud = np.flatnonzero(peaks > threshold)
    if loud.size == 0:
        return wave
    start = max(0, loud[0] * hop - int(lead_s * rate))
    end = min(len(wave), (loud[-1] + 1) * hop + int(trail_s * rate))
    min_cut = int(min_cut_s * rate)
    if start < min_cut:
        start = 0
    if len(wave) - end < min_cut:
        end = len(wave)
    return wave[start:end]


def user_features(wave: np.ndarray, cfg: PreprocessorConfig) -> torch.Tensor:
    """Log-mel features [n_mels, T] of user audio (mono float32 at cfg.sample_rate). A model
    whose preprocessor config sets "trim_silence" (the demo model: its clips were trimmed in
    training, and the per-feature normalisation spreads long silence over every frame) gets
    its leading and trailing silence cut first."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if cfg.extra.get("trim_silence"):
        wave = trim_silence(wave, cfg.sample_rate)
    return log_mel(torch.from_numpy(wave), cfg)[0]


def log_mel_batch(
    waves, cfg: PreprocessorConfig | None = None, include_terminal_frame: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of several clips in one STFT.

    Returns (feats [B, n_mels, T_max] right-padded with pad_value, lengths [B] int64). Each
    clip's frames equal `log_mel` of that clip alone. lengths are 1 + L // hop, or L // hop
    with include_terminal_frame=False (what the reference training mapper keeps).
    """
    cfg = cfg or PreprocessorConfig()
    _check_cfg(cfg)
    xs = [_as_wave(w) for w in waves]
    if not xs:
        raise InputError("log_mel_batch needs at least one waveform")
    for i, x in enumerate(xs):
        if _num_valid(x.shape[0], cfg) < 2:
            raise InputError(
                f"clip {i} too short: {x.shape[0]} samples; need at least {2 * cfg.hop_length}"
            )
        if not torch.isfinite(x).all():
            raise InputError(f"clip {i} contains NaN or infinite samples")
    lengths = torch.tensor([x.shape[0] for x in xs], dtype=torch.int64)
    batch = torch.zeros(len(xs), int(lengths.max()), dtype=torch.float32, device=xs[0].device)
    for i, x in enumerate(xs):
        batch[i, : x.shape[0]] = x.to(batch.device)
    with torch.no_grad():
        feats = _features(batch, lengths.to(batch.device), cfg)
    n_frames = _num_valid(lengths, cfg) + (1 if include_terminal_frame else 0)
    feats = feats[..., : int(n_frames.max())]
    return feats, n_frames

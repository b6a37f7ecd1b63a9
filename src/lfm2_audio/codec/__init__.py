"""Audio codecs: turn 8-codebook frames (12.5 per second) into 24 kHz audio and back.

Every codec offers the same small interface so generation, the CLI and the server do not care
which one a checkpoint ships:

    codec.sample_rate      output sample rate (24000)
    codec.frame_samples    samples per code frame (1920)
    codec.num_codebooks    codebooks per frame (8)
    codec.can_encode       whether encode() works
    codec.decode(codes)    [B, K, T] int64 in [0, 2047] -> [B, T * frame_samples] float32
    codec.encode(wave)     [B, N] float32 at sample_rate -> [B, K, ceil(N / frame_samples)]
    codec.stream(batch)    a decoder that takes frames a few at a time and returns the audio that
                           is final so far; flush() returns what it held back for look-ahead. The
                           pieces joined equal decode() of the concatenation:
                               s = codec.stream(1); s.decode(codes[:, :, t:t+1]); ...; s.flush()
    decode_streams(ss, cs) one decode() for each of several streams (a server's replies), which a
                           codec may batch (the mel codec with Griffin-Lim does)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import AUDIO_CODES, END_OF_AUDIO
from ..errors import InputError

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
DETOKENIZER_DIR = "audio_detokenizer"


def check_codes(codes: torch.Tensor, num_codebooks: int, trim_end_of_audio: bool = True,
                codebook_size: int = AUDIO_CODES) -> torch.Tensor:
    """Validate a [B, K, T] (or [K, T]) code tensor; drop trailing end-of-audio frames.

    A frame whose first code is the end-of-audio code ends the segment: it and everything after
    it are trimmed (when trim_end_of_audio). Any other code outside [0, codebook_size) is an error
    (codecs with smaller codebooks than the model's 2048 pass their own size).
    """
    if not isinstance(codes, torch.Tensor):
        codes = torch.as_tensor(codes)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise InputError(f"audio codes must be integers, got {codes.dtype}")
    if codes.dim() == 2:
        codes = codes.unsqueeze(0)
    if codes.dim() != 3:
        raise InputError(f"audio codes must be [batch, codebooks, frames], got shape {tuple(codes.shape)}")
    if codes.shape[1] != num_codebooks:
        raise InputError(f"expected {num_codebooks} codebooks, got {codes.shape[1]}")
    codes = codes.long()
    if trim_end_of_audio and codes.shape[2] > 0:
        eoa = (codes[:, 0, :] == END_OF_AUDIO).any(dim=0)
        if eoa.any():
            codes = codes[:, :, : int(eoa.nonzero()[0])]
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        bad = codes[(codes < 0) | (codes >= codebook_size)][0].item()
        raise InputError(f"audio codes must be in [0, {codebook_size - 1}], found {bad}")
    return codes


def check_wave(wave, device) -> torch.Tensor:
    """Validate mono audio given as [N], [B, N] or [B, 1, N] floats -> [B, 1, N] float32 on device."""
    if not isinstance(wave, torch.Tensor):
        try:
            wave = torch.as_tensor(np.asarray(wave))
        except Exception as e:
            raise InputError(f"audio must be a float array, got {type(wave).__name__}") from e
    if not wave.dtype.is_floating_point:
        raise InputError(f"audio must be floating point samples, got {wave.dtype}")
    if wave.dim() == 1:
        wave = wave[None]
    if wave.dim() == 2:
        wave = wave[:, None]
    if wave.dim() != 3 or wave.shape[1] != 1:
        raise InputError(f"audio must be [batch, samples] or [batch, 1, samples] (mono), got {tuple(wave.shape)}")
    if not torch.isfinite(wave).all():
        raise InputError("audio contains NaN or infinite samples")
    return wave.to(device=device, dtype=torch.float32)


class CodecInterface:
    """What Mimi and the mel codec share: rates from `self.config`, and input validation."""

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_samples(self) -> int:
        return self.config.frame_samples

    def _check_codes(self, codes) -> torch.Tensor:
        size = min(self.config.codebook_size, AUDIO_CODES)
        return check_codes(codes, self.num_codebooks, codebook_size=size).to(self.device)


def decode_streams(streams: list, codes: list) -> list[torch.Tensor]:
    """`streams[i].decode(codes[i])` for every i, batched where the streams' class can."""
    kinds = {type(s) for s in streams}
    many = getattr(next(iter(kinds)), "decode_many", None) if len(kinds) == 1 else None
    if many is not None:
        return many(streams, codes)
    return [s.decode(c) for s, c in zip(streams, codes)]


def load_codec(path: str | Path, device="cpu", vocoder: str | None = None):
    """The codec a checkpoint directory ships: the LFM2.5 detokenizer if present, else Mimi,
    else the demo model's mel codec (whose vocoder may be chosen: config.VOCODERS)."""
    path = Path(path)
    if vocoder is not None and not (path / "codec" / "config.json").exists():
        raise InputError(f"a vocoder can only be chosen for the demo model's mel codec; {path} has none")
    if (path / DETOKENIZER_DIR / "model.safetensors").exists():
        from .detokenizer import Detokenizer

        return Detokenizer.from_pretrained(path / DETOKENIZER_DIR, device=device)
    if (path / MIMI_FILE).exists():
        from .mimi import Mimi

        return Mimi.from_pretrained(path / MIMI_FILE, device=device)
    if (path / "codec" / "config.json").exists():
        from .melcodec import MelCodec

        return MelCodec.from_pretrained(path / "codec", device=device, vocoder=vocoder)
    raise InputError(
        f"{path} holds no audio codec ({DETOKENIZER_DIR}/, {MIMI_FILE} or codec/): "
        "audio output can only be saved as codes"
    )

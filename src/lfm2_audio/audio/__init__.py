"""Audio input: loading/resampling user audio and the log-mel front end the encoder expects."""

from .features import log_mel, log_mel_batch, mel_filterbank, num_frames
from .io import load_audio, prepare_waveform, resample, save_wav

__all__ = [
    "load_audio",
    "log_mel",
    "log_mel_batch",
    "mel_filterbank",
    "num_frames",
    "prepare_waveform",
    "resample",
    "save_wav",
]

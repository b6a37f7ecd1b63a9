"""The LFM2.5 audio detokenizer: 8-codebook frames -> 24 kHz audio, whole or streamed.

    codes [B, 8, T] --mean of 8 embedding rows--> [B, T, 512] --repeat x6--> [B, 6T, 512]
    --LFM2, causal sliding window 30--> --Linear--> 641 log-magnitudes + 641 phases per step
    --ISTFT (n_fft 1280, hop 320, 'same' padding)--> [B, 1920 T]

One backbone step is 320 samples (13.3 ms); a code frame is 6 steps (80 ms).

Everything is causal, so the detokenizer can stream. The ISTFT is the only look-ahead: output
sample o lies in the padded overlap-add signal at m = o + 480, and the frames of steps up to
m // 320 overlap it. The last 480 samples (20 ms) of code frame t therefore also need steps
6t + 6 and 6t + 7, i.e. the next code frame. `DetokenizerStream.decode` returns exactly the
samples no later frame can touch (1440 for the first frame, then 1920 per frame) and `flush()`
the final 480.

The receptive field of one step is the conv history (2 steps per conv layer) plus 29 steps per
attention layer: windows stack, so at official size a step sees 5*2 + 3*29 = 97 steps (~16 code
frames) back, not 30. The streaming state is still tiny: the last 30 keys/values per attention
layer (a ring), the last 2 gated inputs per conv layer and 960 samples of overlap-add tail.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AUDIO_CODES, Lfm2Config
from ..errors import InputError
from ..weights import empty_modules, load_state, read_json
from ..model.lfm2 import Lfm2Model, apply_rope_half, rope_cos_sin, rope_inv_freq
from . import check_codes

SAMPLE_RATE = 24000
FRAME_SAMPLES = 1920  # 80 ms per code frame
UPSAMPLE = 6  # backbone steps per code frame
HOP = FRAME_SAMPLES // UPSAMPLE  # 320 samples per step
NUM_CODEBOOKS = 8
DEFAULT_OUTPUT_SIZE = 1282  # 2 * (1280 // 2 + 1): log-magnitude and phase of a 1280-point rfft
DEFAULT_WINDOW = 30


class FusedEmbedding(nn.Module):
    """One table holding the 8 codebooks one after another; a frame is the mean of its 8 rows."""

    def __init__(self, codebooks: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(codebooks * AUDIO_CODES, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        # codes [B, K, T] -> [B, T, dim]. Offsets are made here, not stored, so the module can
        # be built on the meta device and filled from the checkpoint.
        offsets = torch.arange(codes.shape[1], device=codes.device)[:, None] * AUDIO_CODES
        return self.emb(codes + offsets).mean(dim=1)


class ISTFT(nn.Module):
    """Inverse STFT with 'same' padding: N frames give exactly N * hop samples.

    Split into frames() and overlap_add() so the streaming decoder can run the same math on a
    few frames at a time and keep the unfinished tail.
    """

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.pad = (n_fft - hop) // 2  # trimmed from both ends
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True))

    def frames(self, spec: torch.Tensor) -> torch.Tensor:
        """Complex spectra [B, N, n_fft // 2 + 1] -> windowed time frames [B, N, n_fft]."""
        return torch.fft.irfft(spec, n=self.n_fft, dim=-1) * self.window

    def overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, N, n_fft] -> [B, (N - 1) * hop + n_fft]: frame j starts at sample j * hop.

        n_fft is a multiple of hop, so each frame is r = n_fft / hop hop-sized pieces and piece i
        of every frame lands in one contiguous run: r vectorised adds instead of a loop over N.
        """
        B, N, _ = frames.shape
        r = self.n_fft // self.hop
        out = frames.new_zeros(B, (N + r - 1) * self.hop)
        pieces = frames.reshape(B, N, r, self.hop)
        for i in range(r):
            out[:, i * self.hop : (i + N) * self.hop] += pieces[:, :, i].reshape(B, N * self.hop)
        return out

    def envelope(self, n_frames: int) -> torch.Tensor:
        """Overlap-added squared window for n_frames frames: what the sum must be divided by."""
        return self.overlap_add(self.window.square().expand(1, n_frames, -1))[0]

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        n = spec.shape[1]
        y = self.overlap_add(self.frames(spec)) / self.envelope(n)
        return y[:, self.pad : self.pad + n * self.hop]


class Detokenizer(nn.Module):
    """Audio codec for LFM2.5-Audio. Parameter names equal the official
    `audio_detokenizer/model.safetensors` keys. Decode only; always float32."""

    sample_rate = SAMPLE_RATE
    frame_samples = FRAME_SAMPLES
    num_codebooks = NUM_CODEBOOKS
    can_encode = False
    # Whole-utterance decode masks a dense [6T, 6T] attention. Past this many frames (~20 s)
    # the same result is computed through the streaming path, whose cost is linear in T.
    dense_max_frames = 256

    def __init__(self, cfg: Lfm2Config):
        super().__init__()
        output_size = int(cfg.extra.get("output_size", DEFAULT_OUTPUT_SIZE))
        n_fft = output_size - 2
        if output_size % 2 or n_fft <= HOP or n_fft % HOP or (n_fft - HOP) % 2:
            raise InputError(f"detokenizer: output_size {output_size} gives no usable ISTFT (hop {HOP})")
        if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size or cfg.head_dim % 2:
            raise InputError("detokenizer: hidden_size must split into heads of even size")
        self.cfg = cfg
        self.window = int(cfg.sliding_window or DEFAULT_WINDOW)
        if self.window < 1:
            raise InputError(f"detokenizer: sliding_window must be >= 1, got {self.window}")
        self.emb = FusedEmbedding(NUM_CODEBOOKS, cfg.hidden_size)
        self.lfm = Lfm2Model(cfg)  # its embed_tokens is dead weight the checkpoint still holds
        self.lin = nn.Linear(cfg.hidden_size, output_size)
        self.istft = ISTFT(n_fft, HOP)

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu") -> "Detokenizer":
        """Load `path/config.json` (HF Lfm2Config) and `path/model.safetensors`, strictly."""
        path = Path(path)
        try:
            cfg = Lfm2Config.from_dict(read_json(path / "config.json"))
        except TypeError as e:
            raise InputError(f"{path / 'config.json'}: {e}") from None
        # Build without allocating (the dead 65536-row table alone is 134 MB), then take the
        # checkpoint's tensors as the parameters.
        with empty_modules():
            model = cls(cfg)
        file = path / "model.safetensors"
        if not file.exists():
            raise InputError(f"no model.safetensors in {path}")
        state = load_state(file, model, f"{file} does not fit the detokenizer config", dtype=torch.float32)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval()

    @property
    def device(self) -> torch.device:
        return self.lin.weight.device

    # ---- pieces shared by whole and streaming decode ----

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, 8, T] -> [B, 6T, D]: each frame's embedding repeated for its 6 steps."""
        return self.emb(codes).repeat_interleave(UPSAMPLE, dim=1)

    def _spectrum(self, h: torch.Tensor) -> torch.Tensor:
        """Backbone output [B, S, D] -> complex spectra [B, S, 641]. No clamp on the exponent,
        as in the reference."""
        log_mag, phase = self.lin(h).chunk(2, dim=-1)
        return torch.polar(log_mag.exp(), phase)

    # ---- codec interface ----

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 8, T] (or [8, T]) in [0, 2047] -> audio [B, 1920 T] float32 at 24 kHz.
        Frames from the first end-of-audio code on are dropped."""
        codes = check_codes(codes, NUM_CODEBOOKS).to(self.device)
        B, _, T = codes.shape
        if T == 0:
            return torch.zeros(B, 0, device=self.device)
        if T > self.dense_max_frames:
            stream = self.stream(B)
            step = self.dense_max_frames
            parts = [stream.decode(codes[:, :, i : i + step]) for i in range(0, T, step)]
            return torch.cat(parts + [stream.flush()], dim=1)
        h = self.lfm(self._embed(codes), window=self.window)
        return self.istft(self._spectrum(h))

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        raise InputError("the LFM2.5 audio detokenizer cannot encode audio (decode only); use Mimi to encode")

    def stream(self, batch_size: int = 1) -> "DetokenizerStream":
        return DetokenizerStream(self, batch_size)


class DetokenizerStream:
    """Decode a few frames at a time. The outputs of decode() followed by flush() concatenate to
    Detokenizer.decode of all the frames (to float rounding); flush() also starts a new utterance.

    Latency: a call with t frames returns 1920 t samples, shifted back by 480: the last 20 ms of
    the newest frame wait for the next frame (its first 2 steps overlap them in the ISTFT).
    """

    def __init__(self, model: Detokenizer, batch_size: int = 1):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.batch = model, batch_size
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next decode() starts a new utterance."""
        m, cfg, B = self.model, self.model.cfg, self.batch
        dev, W = m.device, m.window
        self.steps = 0  # backbone steps seen (= position of the next step)
        self.ended = False  # an end-of-audio frame was seen: ignore further codes until flush
        self.conv = [
            torch.zeros(B, cfg.hidden_size, cfg.conv_L_cache - 1, device=dev)
            for layer in m.lfm.layers
            if not layer.is_attention
        ]
        kv_shape = (B, cfg.num_key_value_heads, W, cfg.head_dim)
        n_attn = sum(layer.is_attention for layer in m.lfm.layers)
        self.keys = [torch.zeros(kv_shape, device=dev) for _ in range(n_attn)]
        self.values = [torch.zeros(kv_shape, device=dev) for _ in range(n_attn)]
        # Position held by each ring slot (slot = position % W); empty slots sit far enough in
        # the past that the window masks them.
        self.slot_pos = torch.full((W,), -2 * W, dtype=torch.long, device=dev)
        tail = m.istft.n_fft - m.istft.hop
        self.tail = torch.zeros(B, tail, device=dev)  # overlap-add sum not yet final
        self.env_tail = torch.zeros(tail, device=dev)  # its squared-window envelope
        self.to_skip = m.istft.pad  # leading padded samples that are not output

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 8, t] -> the audio that became final, [B, 1920 t] (1440 on the first call)."""
        m = self.model
        raw_frames = torch.as_tensor(codes).shape[-1]
        codes = check_codes(codes, NUM_CODEBOOKS).to(m.device)
        if codes.shape[0] != self.batch:
            raise InputError(f"this stream decodes {self.batch} rows, got {codes.shape[0]}")
        if self.ended or codes.shape[2] == 0:
            self.ended |= codes.shape[2] < raw_frames
            return torch.zeros(self.batch, 0, device=m.device)
        self.ended = codes.shape[2] < raw_frames
        h = self._backbone(m._embed(codes))
        return self._overlap_add(m.istft.frames(m._spectrum(h)))

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """The held-back end of the utterance ([B, 480], or [B, 0] if nothing was decoded);
        then reset for a new utterance."""
        istft = self.model.istft
        if self.steps == 0:
            out = torch.zeros(self.batch, 0, device=self.model.device)
        else:
            # Of the unfinished tail, the first (n_fft - hop - pad) samples are output; the rest
            # is the trailing 'same' padding. No frame will be added, so the envelope is final.
            keep = istft.n_fft - istft.hop - istft.pad
            out = self.tail[:, :keep] / self.env_tail[:keep]
        self.reset()
        return out

    def _backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Lfm2Model.forward with a sliding window, continued from the stream's state."""
        lfm, W = self.model.lfm, self.model.window
        cfg = lfm.cfg
        S = x.shape[1]
        pos = self.steps + torch.arange(S, device=x.device)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, x.dtype)
        cos, sin = rope_cos_sin(pos[None], inv_freq, x.dtype)  # batch dim 1 broadcasts
        # Keys are the W ring slots followed by this chunk; RoPE is applied before caching, so
        # key order does not matter, only the mask: key j is seen by query i iff i - W < j <= i.
        key_pos = torch.cat((self.slot_pos, pos))
        rel = pos[:, None] - key_pos[None, :]
        mask = (rel >= 0) & (rel < W)
        # The last min(S, W) steps of the chunk replace the oldest ring entries.
        keep = min(S, W)
        slots = pos[-keep:] % W
        conv_i = attn_i = 0
        for layer in lfm.layers:
            h = layer.operator_norm(x)
            if layer.is_attention:
                h = self._attend(layer.self_attn, h, cos, sin, mask, attn_i, slots, keep)
                attn_i += 1
            else:
                h = layer.conv(h, self.conv[conv_i])  # ShortConv keeps its own 2-step history
                conv_i += 1
            x = x + h
            x = x + layer.feed_forward(layer.ffn_norm(x))
        self.slot_pos[slots] = pos[-keep:]
        self.steps += S
        return lfm.embedding_norm(x)

    def _attend(self, attn, x, cos, sin, mask, i, slots, keep):
        B, S, _ = x.shape
        q = attn.q_layernorm(attn.q_proj(x).view(B, S, attn.n_heads, attn.head_dim)).transpose(1, 2)
        k = attn.k_layernorm(attn.k_proj(x).view(B, S, attn.n_kv, attn.head_dim)).transpose(1, 2)
        v = attn.v_proj(x).view(B, S, attn.n_kv, attn.head_dim).transpose(1, 2)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        ring_k, ring_v = self.keys[i], self.values[i]
        out = F.scaled_dot_product_attention(
            q, torch.cat((ring_k, k), dim=2), torch.cat((ring_v, v), dim=2), attn_mask=mask, enable_gqa=True
        )
        ring_k[:, :, slots] = k[:, :, -keep:]
        ring_v[:, :, slots] = v[:, :, -keep:]
        return attn.out_proj(out.transpose(1, 2).reshape(B, S, -1))

    def _overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        """Add N new frames to the pending tail; return the N * hop samples now final."""
        istft = self.model.istft
        n = frames.shape[1]
        y = istft.overlap_add(frames)
        env = istft.envelope(n)
        t = self.tail.shape[1]
        y[:, :t] += self.tail
        env[:t] += self.env_tail
        done = n * istft.hop  # frame n (not yet made) starts here: nothing before it can change
        self.tail, self.env_tail = y[:, done:], env[done:]
        out = y[:, :done] / env[:done]
        skip = min(self.to_skip, done)
        self.to_skip -= skip
        return out[:, skip:]

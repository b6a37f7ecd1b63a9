"""Training forward pass and loss (spec §9.4), on packed rows.

The backbone's own forward (no cache) is causal over a whole row. A packed row holds several
samples, so `packed_backbone` runs the same layers (their weights, their modules) with
block-diagonal causal attention (each sample attends only to itself), RoPE positions
restarting at each sample, and the short convolutions' history cut at sample boundaries: a
packed row gives the same hidden states as running its samples one by one. Predictions use out[t-1] for the target at t, and only when
t-1 is in the same sample.

Loss: text cross-entropy summed over supervised TEXT targets; for each supervised AUDIO_OUT
frame, the weighted mean over codebooks of the teacher-forced depthformer's cross-entropy;
total = (a * sum text CE + b * sum frame losses) / (a * N_text + b * N_frames + 1e-6).
`forward_sums` returns the numerator and the counts separately so the trainer can normalise
by counts summed over gradient-accumulation steps and data-parallel ranks: the gradient is
then that of the loss of the whole global batch, whatever way it is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..config import AUDIO_CODES, END_OF_AUDIO, MODALITY_AUDIO_OUT, LFM2AudioConfig
from ..errors import InputError
from ..generation.beam import ctc_log_probs
from ..generation.sampling import CHAT_AUDIO
from ..model.conformer import subsampled_length
from ..model.lfm2 import Lfm2Model, apply_rope_half, rope_cos_sin, rope_inv_freq
from .data import Batch

TEXT_CHUNK = 4096  # text-logit rows per chunk: [chunk, vocab] logits are recomputed in backward
DEPTH_CHUNK = 8192  # frames per depthformer call (the reference uses pieces of < 2^14)
# Attention shapes change every step (packed segment groups, frame counts). cuDNN's attention,
# which PyTorch prefers for bf16 on Hopper, builds a plan per new shape: measured on an H200,
# bf16 steps were 2.6x slower with it (d=256 model) and 1.8x (official size). Flash /
# memory-efficient kernels need no per-shape setup.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def codebook_weights(cfg: LFM2AudioConfig) -> torch.Tensor:
    """Per-codebook loss weights: "log": factor^(1 - k/(K-1)) (factor for the semantic codebook
    0 down to 1 for the last); "linear": [factor, 1, 1, ...]."""
    K, factor = cfg.codebooks, float(cfg.semantic_codebook_factor)
    if cfg.codebook_weight == "log":
        return torch.tensor([factor ** (1 - k / (K - 1)) if K > 1 else factor for k in range(K)], dtype=torch.float64).float()
    if cfg.codebook_weight == "linear":
        return torch.tensor([factor] + [1.0] * (K - 1))
    raise InputError(f"codebook_weight must be 'log' or 'linear', got {cfg.codebook_weight!r}")


# ---- backbone over packed rows ---------------------------------------------------------------


def segment_groups(lengths: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Group the segments of the flattened rows (samples and padding runs, in order) by length
    for attention: each group is (index [n, Lmax] into the B*L positions, valid [n, Lmax]).
    A group holds segments within 2x of its longest, so padding to that length wastes less
    than 4x of the ideal sum n_i^2 work, with at most log2(L) + 1 attention calls per layer."""
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current = [], []
    for i in order:
        if current and 2 * lengths[i] < lengths[current[0]]:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    out = []
    for g in groups:
        lens = torch.tensor([lengths[i] for i in g], device=device)
        first = torch.tensor([starts[i] for i in g], device=device)[:, None]
        offs = torch.arange(int(lens[0]), device=device)[None]
        valid = offs < lens[:, None]
        # slots past a segment's end read its first position: they are keys after every real
        # query (never attended under the causal mask) and their outputs are dropped
        out.append((torch.where(valid, first + offs, first), valid))
    return out


def _attention(attn, x, cos, sin, groups):
    """Block-diagonal causal attention: each segment attends only within itself. Segments are
    gathered into padded [n, Lmax] batches (one per length group) and run with is_causal, the
    fast kernels' path, instead of a dense [L, L] mask over the whole row."""
    B, S, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv, attn.head_dim
    q = attn.q_layernorm(attn.q_proj(x).view(B, S, H, hd)).transpose(1, 2)
    k = attn.k_layernorm(attn.k_proj(x).view(B, S, Hkv, hd)).transpose(1, 2)
    v = attn.v_proj(x).view(B, S, Hkv, hd)
    q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
    qf, kf, vf = q.transpose(1, 2).reshape(B * S, H, hd), k.transpose(1, 2).reshape(B * S, Hkv, hd), v.reshape(B * S, Hkv, hd)
    results = []
    for idx, valid in groups:
        o = F.scaled_dot_product_attention(qf[idx].transpose(1, 2), kf[idx].transpose(1, 2), vf[idx].transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        results.append((idx[valid], o.transpose(1, 2)[valid]))
    out = results[0][1].new_empty(B * S, H, hd)
    for where, o in results:
        out[where] = o
    return attn.out_proj(out.view(B, S, H * hd))


def _short_conv(conv, x, position):
    """The gated depth-wise causal conv, with taps that would reach into the previous sample
    (lag > position within the sample) dropped: as if each sample started from zero history."""
    b_gate, c_gate, xv = conv.in_proj(x).transpose(1, 2).chunk(3, dim=1)
    u = b_gate * xv  # [B, D, S]
    w = conv.conv.weight[:, 0]  # [D, k]; output t = sum_lag w[:, k-1-lag] * u[t-lag]
    k, S = w.shape[1], u.shape[2]
    v = u * w[:, k - 1, None]
    for lag in range(1, k):
        shifted = F.pad(u, (lag, 0))[:, :, :S]
        v = v + torch.where((position >= lag)[:, None], shifted, 0.0) * w[:, k - 1 - lag, None]
    if conv.conv.bias is not None:
        v = v + conv.conv.bias[:, None]
    return conv.out_proj((c_gate * v.to(c_gate.dtype)).transpose(1, 2))


def packed_backbone(lfm: Lfm2Model, x: torch.Tensor, position: torch.Tensor, segment_lengths: list[int]) -> torch.Tensor:
    """Lfm2Model.forward for rows of several samples: x [B, L, D]; position [B, L] the offset of
    each position in its sample; segment_lengths the lengths of the samples and padding runs
    of the flattened rows, in order (what `collate` records)."""
    cfg = lfm.cfg
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, x.dtype)
    cos, sin = rope_cos_sin(position, inv_freq, x.dtype)
    groups = segment_groups(segment_lengths, x.device)
    for layer in lfm.layers:
        h = layer.operator_norm(x)
        h = _attention(layer.self_attn, h, cos, sin, groups) if layer.is_attention else _short_conv(layer.conv, h, position)
        x = x + h
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return lfm.embedding_norm(x)


# ---- loss ------------------------------------------------------------------------------------


@dataclass
class LossSums:
    numerator: torch.Tensor  # a * sum text CE + b * sum frame losses (carries the graph)
    text_sum: float
    n_text: int
    audio_sum: float
    n_frames: int
    text_loss_multiplier: float = 1.0
    audio_loss_multiplier: float = 1.0

    @property
    def denominator(self) -> float:
        return self.text_loss_multiplier * self.n_text + self.audio_loss_multiplier * self.n_frames + 1e-6


def _text_ce_sum(model, h, targets):
    return F.cross_entropy(model.text_logits(h).float(), targets, reduction="sum")


def _frame_losses(model, h, targets, weights):
    logits = model.depth_logits_teacher_forced(h, targets).float()  # [N, K, V]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return (ce * weights).sum(-1) / weights.sum()


def forward_sums(model, batch: Batch, touch_all: bool = False, ctc_weight: float = 0.0,
                 code_noise: float = 0.0, self_feed: float = 0.0) -> LossSums:
    """Run the model over a batch; return the loss numerator and the per-part sums and counts.

    touch_all: also run the parts the batch does not need (audio encoder on a text-only batch,
    depthformer without audio targets, ...) with a zero weight, so every trainable parameter
    gets a gradient every step. DistributedDataParallel needs that (or find_unused_parameters).
    ctc_weight: add this times `ctc_sum` (below) to the numerator; 0 is the spec's loss.
    code_noise: replace this share of the output codes the model reads back as input (never the
    targets) by random codes. Teacher-forced, the text after an interleaved audio run always
    follows true speech codes; generating, it follows the model's own samples, and a model that
    leans on those codes loses its text where its speech goes wrong.
    self_feed: read back this share of the output frames as the model's own samples instead
    (`own_codes`: a first pass without gradient samples them), so that text and speech learn to
    go on from speech the model would have made. Costs a forward pass more per step.
    """
    with sdpa_kernel(SDPA_BACKENDS):
        return _forward_sums(model, batch, touch_all, ctc_weight, code_noise, self_feed)


def noisy_codes(codes: torch.Tensor, share: float, vocab: int = AUDIO_CODES) -> torch.Tensor:
    """codes [N, K] with `share` of the entries (not end-of-audio frames) drawn anew in [0, vocab)."""
    hit = (torch.rand(codes.shape, device=codes.device) < share) & (codes < vocab)
    return torch.where(hit, torch.randint_like(codes, vocab), codes)


def ctc_sum(model, enc: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed CTC loss of each transcribed clip's encoded vectors (adapter outputs) against its
    transcript (an ASR sample's reply, or a user clip's `Audio.transcript`), read through the
    final norm (embedding_norm) and the text head, blank = the pad id 0.

    An auxiliary loss for training from scratch: with the spec's loss alone a fresh model learns
    the text prior first, the encoder's gradient stays weak, and its output collapses to one
    constant vector (measured: after 500 steps, input-dependent part 0.5% of its norm), so the
    model never learns to listen. CTC gives the encoder a direct, per-frame signal. The official
    checkpoints start from a CTC-trained encoder, so fine-tuning them does not need it."""
    stages = model.cfg.encoder.n_subsampling_stages
    pieces = torch.split(enc, [int(subsampled_length(f.shape[-1], stages)) for f in batch.audio_in])
    pairs = [(p, t) for p, t in zip(pieces, batch.transcripts) if t is not None]
    if not pairs:
        return enc.new_zeros((), dtype=torch.float32)
    h = nn.utils.rnn.pad_sequence([p for p, _ in pairs])  # [T, N, D]
    log_probs = ctc_log_probs(model, h)
    targets = torch.cat([t for _, t in pairs])
    return F.ctc_loss(log_probs, targets, torch.tensor([p.shape[0] for p, _ in pairs]),
                      torch.tensor([t.numel() for _, t in pairs]), blank=0, reduction="sum", zero_infinity=True)


@torch.no_grad()
def own_codes(model, batch: Batch, h: torch.Tensor, share: float, params) -> torch.Tensor:
    """The batch's output codes [N, K] as the model would have spoken them: `share` of the
    frames (drawn at random; never end-of-audio frames) replaced by a frame sampled with `params`
    from the backbone state before it, as generation does (all K codebooks from the depthformer,
    each after the sampled ones before it). One step ahead only: the state itself saw true codes.
    A sampled end-of-audio keeps the true frame, so the layout of the sequence stays the same."""
    B, L = batch.modality.shape
    out = batch.modality == MODALITY_AUDIO_OUT
    _, audio_sel = batch.targets()
    pred = torch.zeros(B, L, model.cfg.codebooks, dtype=torch.long, device=h.device)
    pred[out] = batch.audio_out
    pred[:, 1:][audio_sel] = model.sample_frame(h[:, :-1][audio_sel].to(model.dtype), params)
    pred = pred[out]
    true = batch.audio_out
    keep = (true[:, :1] == END_OF_AUDIO) | (pred[:, :1] == END_OF_AUDIO)
    keep |= torch.rand(true.shape[0], 1, device=h.device) >= share
    return torch.where(keep, true, pred)


def backbone_states(model, batch: Batch, code_noise: float = 0.0, codes_in: torch.Tensor | None = None,
                    enc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder outputs of a batch's input clips (`enc`, when already computed: they do not
    depend on the codes) and the backbone states [B, L, D] over its rows, reading `codes_in`
    (default: the batch's output codes) as the output frames' inputs, with `code_noise` of them
    replaced by random codes (`noisy_codes`)."""
    B, L = batch.modality.shape
    enc = model.encode_audio(batch.audio_in) if enc is None else enc
    codes_in = batch.audio_out if codes_in is None else codes_in
    codes_in = noisy_codes(codes_in, code_noise) if code_noise else codes_in
    x = model.embed_inputs(batch.text, enc, codes_in, batch.modality.reshape(-1)).view(B, L, -1)
    h = packed_backbone(model.lfm, x, batch.position, batch.segment_lengths) if batch.packed else model.lfm(x)
    return enc, h


def _forward_sums(model, batch: Batch, touch_all: bool, ctc_weight: float = 0.0, code_noise: float = 0.0,
                  self_feed: float = 0.0) -> LossSums:
    cfg = model.cfg
    B, L = batch.modality.shape
    dev = batch.modality.device
    enc, codes_in = model.encode_audio(batch.audio_in), None
    if self_feed and batch.audio_out.shape[0]:
        with torch.no_grad():
            _, h = backbone_states(model, batch, enc=enc.detach())
            codes_in = own_codes(model, batch, h, self_feed, CHAT_AUDIO)
    enc, h = backbone_states(model, batch, code_noise, codes_in, enc)

    text_sel, audio_sel = batch.targets()
    prev = h[:, :-1]
    text_ids = torch.zeros(B, L, dtype=torch.long, device=dev)
    text_ids[batch.modality == 1] = batch.text
    frames = torch.zeros(B, L, cfg.codebooks, dtype=torch.long, device=dev)
    frames[batch.modality == 3] = batch.audio_out

    text_h, text_t = prev[text_sel], text_ids[:, 1:][text_sel]
    text_sum = h.new_zeros((), dtype=torch.float32)
    for i in range(0, text_t.shape[0], TEXT_CHUNK):
        # checkpointed: [chunk, vocab] fp32 logits are not kept for backward, only recomputed
        text_sum = text_sum + checkpoint(_text_ce_sum, model, text_h[i : i + TEXT_CHUNK], text_t[i : i + TEXT_CHUNK],
                                         use_reentrant=False)

    weights = codebook_weights(cfg).to(dev)
    audio_h, audio_t = prev[audio_sel], frames[:, 1:][audio_sel]
    audio_sum = h.new_zeros((), dtype=torch.float32)
    for i in range(0, audio_t.shape[0], DEPTH_CHUNK):
        audio_sum = audio_sum + _frame_losses(model, audio_h[i : i + DEPTH_CHUNK], audio_t[i : i + DEPTH_CHUNK], weights).sum()

    a, b = cfg.text_loss_multiplier, cfg.audio_loss_multiplier
    numerator = a * text_sum + b * audio_sum
    if ctc_weight:
        numerator = numerator + ctc_weight * ctc_sum(model, enc, batch)
    if touch_all:
        numerator = numerator + 0.0 * _unused_parts(model, batch, int(audio_t.shape[0]), h)
    return LossSums(numerator, float(text_sum.detach()), int(text_t.shape[0]), float(audio_sum.detach()),
                    int(audio_t.shape[0]), a, b)


def _unused_parts(model, batch: Batch, n_frames: int, h: torch.Tensor) -> torch.Tensor:
    K = model.cfg.codebooks
    out = h.new_zeros((), dtype=torch.float32)
    if not batch.audio_in:
        n_mels = model.cfg.encoder.feat_in
        out = out + model.encode_audio([torch.zeros(n_mels, 16, device=h.device)]).float().sum()
    if n_frames == 0:
        z = torch.zeros(1, K, dtype=torch.long, device=h.device)
        out = out + model.depth_logits_teacher_forced(h[:1, 0], z).float().sum()
    if batch.audio_out.shape[0] == 0:
        out = out + model.embed_audio_frames(torch.zeros(1, K, dtype=torch.long, device=h.device)).float().sum()
    return out


def loss_fn(model, batch: Batch) -> tuple[torch.Tensor, dict]:
    """The spec's loss of one batch, normalised by its own counts, and its parts' means."""
    s = forward_sums(model, batch)
    return s.numerator / s.denominator, metrics(s.text_sum, s.n_text, s.audio_sum, s.n_frames,
                                                 s.text_loss_multiplier, s.audio_loss_multiplier)


def metrics(text_sum, n_text, audio_sum, n_frames, a=1.0, b=1.0) -> dict:
    return {
        "loss": (a * text_sum + b * audio_sum) / (a * n_text + b * n_frames + 1e-6),
        "text_loss": text_sum / n_text if n_text else math.nan,
        "audio_loss": audio_sum / n_frames if n_frames else math.nan,
        "text_tokens": n_text,
        "audio_frames": n_frames,
    }


class TrainingModel(nn.Module):
    """Wraps the model so one forward call returns the loss sums: what DDP wraps."""

    def __init__(self, model, touch_all: bool = False, ctc_weight: float = 0.0, code_noise: float = 0.0,
                 self_feed: float = 0.0):
        super().__init__()
        self.model = model
        self.touch_all, self.ctc_weight, self.code_noise, self.self_feed = touch_all, ctc_weight, code_noise, self_feed

    def forward(self, batch: Batch) -> LossSums:
        return forward_sums(self.model, batch, self.touch_all, self.ctc_weight, self.code_noise, self.self_feed)


# ---- parameters ------------------------------------------------------------------------------


def dead_parameter_names(model) -> list[str]:
    """Parameters no forward pass ever uses: the audio embedding's output head (only its table
    is used, as input) and, with untied depth heads, the last codebook's input table (no later
    codebook consumes its code). Kept in checkpoints, never trained."""
    last_input_table = f"depth_embeddings.{model.cfg.codebooks - 1}.embedding.weight"
    dead = []
    for name, _ in model.named_parameters():
        if name.startswith(("audio_embedding.embedding_norm.", "audio_embedding.to_logits.")):
            dead.append(name)
        elif name == last_input_table and not model.cfg.depthformer.tie:
            dead.append(name)
    return dead


def freeze_batchnorm(model) -> None:
    """Keep BatchNorm layers (in the audio encoder) on their running statistics while training.

    Batch statistics would be taken over padded clip batches whose make-up depends on packing,
    so a sample's loss would depend on its batch-mates (and differ between DDP ranks); for
    fine-tuning the pretrained running statistics are the right ones anyway. Their affine
    weights still train. From scratch, the layers act as a learned per-channel affine map.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()

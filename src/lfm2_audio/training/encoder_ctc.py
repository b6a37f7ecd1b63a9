"""Audio-encoder pretraining: the FastConformer alone, trained by CTC on ASR clips.

    lfm2-audio pretrain-encoder CONFIG.json [key=value ...]

A model trained from scratch needs an encoder that already hears words: with the spec's loss
alone a fresh conformer collapses to one constant vector, and with an auxiliary CTC through the
2,048-token text head it sits on CTC's blank plateau for thousands of steps (the demo recipe's
logs). The official checkpoints start from a CTC-trained FastConformer for the same reason.

This stage trains the conformer with a head of its own (LayerNorm + linear) over a small BPE
vocabulary (`ctc_tokenizer`, a few hundred ids): units shared by many words are learned from
many more examples than whole-word tokens, and it runs ~8x more clips per second than the full
model. The transcripts are the ASR samples' supervised text (stored as the model tokenizer's ids,
decoded and re-encoded here), and with `clips="transcribed"` also every other user clip that
carries its words (`Audio.transcript`, e.g. spoken questions). The output,
`OUTPUT_DIR/encoder.safetensors`, holds `conformer.*` (the names of the full model) and
`ctc_head.*`; `TrainConfig.init_encoder_from` loads it.

The stage is short and restartable from scratch, so it saves at every evaluation but keeps no
optimizer state for resuming.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import LFM2AudioConfig
from ..errors import InputError
from ..model.conformer import ConformerEncoder, pad_clips
from ..processor import Tokenizer
from .data import FIRST_REGULAR_ID, SampleStore, asr_transcript, clip_transcripts
from .loss import freeze_batchnorm
from .trainer import (
    autocast_for,
    check_precision,
    config_arguments,
    config_from_dict,
    init_weights,
    load_config_file,
    lr_at,
    param_groups,
)

ENCODER_FILE = "encoder.safetensors"


CLIP_SETS = ("asr", "transcribed")  # EncoderPretrainConfig.clips, load_clips' `which`


@dataclass
class EncoderPretrainConfig:
    model_config: str  # the full model's config.json: its "encoder" section is trained here
    tokenizer: str  # the model's tokenizer.json (decodes the stored transcripts)
    ctc_tokenizer: str  # a small BPE tokenizer.json whose ids are the CTC targets
    train_data: str | list
    output_dir: str
    val_data: str | list | None = None
    init_from: str | None = None  # an earlier stage's output to continue (weights only; a fresh schedule)
    batch_clips: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    max_steps: int = 4000
    max_minutes: float | None = None  # stop early (cosine still planned over max_steps)
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    init_std: float = 0.02
    precision: str = "auto"  # as in TrainConfig
    threads: int | None = None
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    eval_clips: int = 64
    clips: str = "asr"  # "asr": ASR samples' clips; "transcribed": every clip whose words are known

    @classmethod
    def from_dict(cls, d: dict) -> EncoderPretrainConfig:
        cfg = config_from_dict(cls, d, "encoder pretraining config")
        check_precision(cfg.precision)
        if cfg.clips not in CLIP_SETS:
            raise InputError(f"clips must be one of {CLIP_SETS}, got {cfg.clips!r}")
        for name in ("batch_clips", "max_steps", "log_every", "eval_every", "eval_clips"):
            if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
                raise InputError(f"{name} must be a positive integer")
        return cfg


class CTCHead(nn.Module):
    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class EncoderCTC(nn.Module):
    """The full model's conformer (same parameter names) plus a CTC head; blank = id 0 (pad)."""

    def __init__(self, cfg: LFM2AudioConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.conformer = ConformerEncoder(cfg.encoder)
        self.ctc_head = CTCHead(cfg.encoder.d_model, vocab_size)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Log-mel clips [n_mels, T_i] -> padded log-probabilities [T, N, V] and lengths."""
        weight = self.ctc_head.proj.weight
        x, out_lens = self.conformer(*pad_clips(features, weight.dtype, weight.device))
        return self.ctc_head(x).float().log_softmax(-1).transpose(0, 1), [int(n) for n in out_lens]


def greedy_decode(log_probs: torch.Tensor, lengths: list[int]) -> list[list[int]]:
    """Best path, repeats merged, blanks dropped."""
    best = log_probs.argmax(-1).T.tolist()
    out = []
    for row, n in zip(best, lengths):
        ids, prev = [], None
        for i in row[:n]:
            if i != prev and i != 0:
                ids.append(i)
            prev = i
        out.append(ids)
    return out


def load_clips(store: SampleStore, tok: Tokenizer, ctc_tok, limit: int | None = None, which: str = "asr"):
    """(log-mel, transcript text, CTC target ids) of every ASR sample's clip in a store, or with
    which="transcribed" of every clip with a transcript."""
    clips = []
    for i in range(len(store)):
        s = store[i]
        said = clip_transcripts(s) if which == "transcribed" else [asr_transcript(s)]
        for features, ids in zip(s.audio_in, said):
            if ids is None:
                continue
            text = tok.decode(ids.tolist())
            target = [t for t in ctc_tok.encode(text).ids if t >= FIRST_REGULAR_ID]
            if target:
                clips.append((features, text, torch.tensor(target)))
        if limit and len(clips) >= limit:
            return clips[:limit]
    return clips


def ctc_loss_per_token(model: EncoderCTC, clips) -> torch.Tensor:
    return _ctc_per_token(*model([f for f, _, _ in clips]), [t for _, _, t in clips])


def _ctc_per_token(log_probs: torch.Tensor, lengths: list[int], targets: list[torch.Tensor]) -> torch.Tensor:
    loss = F.ctc_loss(log_probs, torch.cat(targets), torch.tensor(lengths), torch.tensor([t.numel() for t in targets]),
                      blank=0, reduction="sum", zero_infinity=True)
    return loss / sum(t.numel() for t in targets)


def evaluate(model: EncoderCTC, clips, ctc_tok, autocast) -> dict:
    from ..evaluation import wer

    model.eval()
    with torch.no_grad(), autocast():
        log_probs, lengths = model([f for f, _, _ in clips])
        loss = float(_ctc_per_token(log_probs, lengths, [t for _, _, t in clips]))
    model.train()
    freeze_batchnorm(model)
    hyps = [ctc_tok.decode(ids) for ids in greedy_decode(log_probs, lengths)]
    return {"val_ctc": round(loss, 4), "val_wer": round(wer([t for _, t, _ in clips], hyps), 4),
            "example": hyps[0], "reference": clips[0][1]}


def encoder_file(path) -> Path:
    """An encoder.safetensors, given as the file or its directory."""
    path = Path(path)
    path = path / ENCODER_FILE if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"pretrained encoder not found: {path}")
    return path


def save_encoder(model: EncoderCTC, output_dir: Path) -> Path:
    from safetensors.torch import save_file

    path = output_dir / ENCODER_FILE
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path


def pretrain(cfg: EncoderPretrainConfig, log=print) -> dict:
    from tokenizers import Tokenizer as BPE

    torch.set_flush_denormal(True)  # denormals make CPU steps erratic and up to 5x slower
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer.from_pretrained(cfg.tokenizer)
    if not Path(cfg.ctc_tokenizer).is_file():
        raise InputError(f"CTC tokenizer not found: {cfg.ctc_tokenizer}")
    ctc_tok = BPE.from_file(cfg.ctc_tokenizer)
    model_cfg = LFM2AudioConfig.from_json(cfg.model_config)
    model = EncoderCTC(model_cfg, ctc_tok.get_vocab_size())
    init_weights(model, cfg.init_std)
    if cfg.init_from:
        from safetensors.torch import load_file

        path = encoder_file(cfg.init_from)
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        if missing or unexpected:
            raise InputError(f"init_from {path} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.train()
    freeze_batchnorm(model)

    t0 = time.time()
    train = load_clips(SampleStore(cfg.train_data), tok, ctc_tok, which=cfg.clips)
    val = load_clips(SampleStore(cfg.val_data), tok, ctc_tok, cfg.eval_clips, cfg.clips) if cfg.val_data else []
    if not train:
        raise InputError(f"no {'ASR samples' if cfg.clips == 'asr' else 'transcribed clips'} in {cfg.train_data}")
    log(f"encoder CTC: {len(train)} training clips, {len(val)} validation clips "
        f"({np.mean([t.numel() for _, _, t in train]):.1f} targets per clip), loaded in {time.time() - t0:.0f} s")

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    autocast = autocast_for(cfg.precision, torch.device("cpu"))
    log_file = (output_dir / "log.jsonl").open("a")
    t0, seen, last, result = time.time(), 0, [], {}
    for step in range(cfg.max_steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg)
        chosen = rng.sample(train, min(cfg.batch_clips, len(train)))
        with autocast():
            loss = ctc_loss_per_token(model, chosen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        seen += len(chosen)
        last.append(float(loss.detach()))
        minutes = (time.time() - t0) / 60
        end = step + 1 == cfg.max_steps or (cfg.max_minutes is not None and minutes >= cfg.max_minutes)
        if (step + 1) % cfg.log_every == 0 or end:
            rec = {"step": step + 1, "ctc": round(float(np.mean(last)), 4), "lr": round(lr_at(step, cfg), 6),
                   "clips_per_s": round(seen / (time.time() - t0), 1), "minutes": round(minutes, 2)}
            last = []
            if val and ((step + 1) % cfg.eval_every == 0 or end):
                rec.update(evaluate(model, val, ctc_tok, autocast))
                save_encoder(model, output_dir)
            log(" ".join(f"{k} {v}" for k, v in rec.items()))
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            result = rec
        if end:
            break
    path = save_encoder(model, output_dir)
    log(f"encoder CTC: {step + 1} steps in {(time.time() - t0) / 60:.1f} min -> {path}")
    return result


def load_pretrained_encoder(model, path) -> None:
    """Copy `conformer.*` from an encoder.safetensors (or its directory) into a full model;
    every conformer tensor must be there with the model's shape."""
    from safetensors.torch import load_file

    path = encoder_file(path)
    saved = {k: v for k, v in load_file(str(path)).items() if k.startswith("conformer.")}
    own = {k: v for k, v in model.state_dict().items() if k.startswith("conformer.")}
    missing = sorted(set(own) - set(saved))
    wrong = sorted(k for k in own if k in saved and saved[k].shape != own[k].shape)
    if missing or wrong:
        raise InputError(f"{path} does not fit this model's encoder: missing {missing[:5]}, "
                         f"misshapen {[(k, tuple(saved[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(saved[k])


def main(argv: list[str] | None = None) -> int:
    """`pretrain-encoder CONFIG [key=value ...]`: CTC-train the audio encoder alone."""
    config = config_arguments("lfm2-audio pretrain-encoder", main.__doc__, "EncoderPretrainConfig", argv)
    try:
        pretrain(EncoderPretrainConfig.from_dict(load_config_file(*config)),
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

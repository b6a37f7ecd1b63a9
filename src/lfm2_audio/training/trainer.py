"""Training loop: AdamW, warm-up + cosine LR, bf16 autocast, packed rows, DDP, exact resume.

    lfm2-audio train CONFIG.json            (or: python -m lfm2_audio.training.trainer CONFIG)
    torchrun --nproc_per_node 4 -m lfm2_audio.training.trainer CONFIG.json

CONFIG is a JSON or TOML file holding `TrainConfig` fields; `key=value` arguments after it
override them (values parsed as JSON when they can be). Minimal fine-tuning config:

    {"init_from": "path/to/LFM2-Audio-1.5B", "train_data": "data/train", "val_data": "data/val",
     "output_dir": "runs/ft1", "max_steps": 1000, "lr": 3e-5}

Training from scratch: give "model_config": "config.json" instead of init_from (and
"copy_assets_from" a directory with tokenizer.json, so checkpoints are usable for inference).

Precision: parameters and AdamW state stay in fp32 (the master weights); the forward runs under
bf16 autocast. That costs 16 bytes per parameter (1.5B: ~24 GB) but avoids the reference's
bf16-parameter updates, where a step smaller than bf16 resolution is lost (spec §13.19).
"auto" (the default) runs fp32 instead on a CPU without bf16 arithmetic (no AVX-512 or AMX),
where torch's bf16 fallback made a demo step about 15x slower than fp32 (2-core AVX2 EPYC).

Batch = batch_rows rows x context_length positions per process and accumulation step; the loss
is normalised by the target counts of the whole global batch (all ranks, all accumulation
steps), so the update does not depend on how the batch is split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import LFM2AudioConfig
from ..errors import InputError
from ..model.lfm2_audio import LFM2AudioModel, parse_device, resolve_checkpoint
from ..model.quantize import native_half
from .data import SampleStore, collate, pack_rows
from .loss import (
    TrainingModel,
    dead_parameter_names,
    forward_sums,
    freeze_batchnorm,
    metrics,
)

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    output_dir: str
    train_data: str | list = ""  # precomputed sample set directory (or a list of them)
    val_data: str | list | None = None
    # model: a checkpoint to fine-tune, or a config.json to train from scratch
    init_from: str | None = None
    model_config: str | None = None
    init_std: float = 0.02  # fresh models: normal(0, init_std) for linear and embedding weights
    init_encoder_from: str | None = None  # fresh models: conformer weights from `pretrain-encoder`
    copy_assets_from: str | None = None  # tokenizer/codec files copied next to saved weights (default init_from)
    freeze: list = field(default_factory=list)  # parameter-name prefixes not to train, e.g. ["conformer."]
    # batch
    context_length: int = 4096
    batch_rows: int = 16  # rows per process per accumulation step
    grad_accum_steps: int = 1
    pack_window: int = 64
    pad_id: int = 0
    # optimiser and schedule
    lr: float = 3e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 1000
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not on norms, biases or embeddings
    grad_clip: float = 1.0  # 0 disables
    ctc_weight: float = 0.0  # auxiliary CTC on ASR clips' encoder outputs (training.loss.ctc_sum); from scratch: ~0.3
    code_noise: float = 0.0  # share of output codes read back as input replaced by random ones (loss.forward_sums)
    self_feed: float = 0.0  # share of output frames read back as the model's own samples (loss.forward_sums)
    # runtime
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto" (see the module docstring)
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_rows: int | None = None  # cap on validation rows (None: all)
    save_every: int = 500
    keep_checkpoints: int = 3
    resume: str | bool = "auto"  # "auto": latest checkpoint in output_dir; a checkpoint dir; false

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        cfg = config_from_dict(cls, d, "training config")
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path, overrides: list[str] | None = None) -> TrainConfig:
        return cls.from_dict(load_config_file(path, overrides))

    def validate(self) -> None:
        if not self.train_data:
            raise InputError("training config needs train_data (a precomputed sample set)")
        if (self.init_from is None) == (self.model_config is None):
            raise InputError("give exactly one of init_from (a checkpoint) and model_config (a config.json)")
        if self.init_encoder_from and self.init_from:
            raise InputError("init_encoder_from starts a fresh model (model_config); init_from already has an encoder")
        check_precision(self.precision)
        for name in ("context_length", "batch_rows", "grad_accum_steps", "max_steps", "log_every", "eval_every",
                     "save_every", "keep_checkpoints", "pack_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.lr <= 0:
            raise InputError("need lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        for name in ("code_noise", "self_feed"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"{name} must lie in [0, 1), got {getattr(self, name)}")


def load_config_file(path, overrides: list[str] | None = None) -> dict:
    """A JSON or TOML config as a dict, with `key=value` overrides (values parsed as JSON when
    they can be, else kept as strings)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config not found: {path}")
    try:
        if path.suffix == ".toml":
            import tomllib

            d = tomllib.loads(path.read_text())
        else:
            d = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise InputError(f"cannot read config {path}: {e}") from None
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"override {item!r} is not key=value")
        try:
            d[key] = json.loads(value)
        except json.JSONDecodeError:
            d[key] = value
    return d


def config_from_dict(cls, d: dict, what: str):
    """A config dataclass from a dict, naming unknown keys and missing required ones."""
    fields = dataclasses.fields(cls)
    unknown = sorted(set(d) - {f.name for f in fields})
    if unknown:
        raise InputError(f"unknown {what} keys: {', '.join(unknown)}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in d]
    if missing:
        raise InputError(f"{what} needs {', '.join(missing)}")
    return cls(**d)


def config_arguments(prog: str, description: str, fields: str, argv) -> tuple[str, list[str]]:
    """The command line of a config-driven command: CONFIG [key=value ...]."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("config", help=f"JSON or TOML file of {fields} fields")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=10 lr=1e-4")
    args = p.parse_args(argv)
    return args.config, args.overrides


@dataclass
class TrainResult:
    model: LFM2AudioModel
    final_dir: Path
    step: int
    train: dict  # metrics of the last logged interval
    val: dict | None


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast_for(precision: str, device: torch.device, say: bool = True):
    """A factory of the forward's autocast context for a config's precision on device."""
    slow_bf16 = device.type == "cpu" and not native_half(torch.bfloat16)
    use_bf16 = precision == "bf16" or (precision == "auto" and not slow_bf16)
    if say and use_bf16 and slow_bf16:
        print("note: this CPU has no bf16 arithmetic, so bf16 autocast runs about 15x slower "
              "than precision=fp32 (or auto)", file=sys.stderr)
    elif say and precision == "auto":
        print(f"precision: {'bf16 autocast' if use_bf16 else 'fp32 (this CPU has no bf16 arithmetic)'}",
              file=sys.stderr)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine down to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - lo)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Fresh-model init: linear and embedding weights normal(0, std), biases zero; the backbone's
    residual output projections scaled by 1/sqrt(2 * layers) so the residual stream does not
    grow with depth (GPT-2's recipe). Convolutions and norms keep PyTorch's defaults."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    if hasattr(model, "lfm"):
        scale = std / math.sqrt(2 * len(model.lfm.layers))
        for layer in model.lfm.layers:
            op = layer.self_attn if layer.is_attention else layer.conv
            nn.init.normal_(op.out_proj.weight, 0.0, scale)
            nn.init.normal_(layer.feed_forward.w2.weight, 0.0, scale)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no decay on norms, biases (1-D), embedding tables (the text table is
    also the output head) or the conformer's per-head position biases."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and id(p) not in embeddings and "pos_bias" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- data plan -------------------------------------------------------------------------------


class DataPlan:
    """Which rows each step uses. An epoch = a seeded shuffle of all samples, packed into rows;
    a step takes the next batch_rows * world * accum rows (rank r, accumulation step m gets slice
    m * world + r). State is (epoch, cursor in rows): saving it makes resume exact."""

    def __init__(self, store: SampleStore, cfg: TrainConfig, world: int):
        self.store, self.cfg, self.world = store, cfg, world
        self.per_step = cfg.batch_rows * world * cfg.grad_accum_steps
        self.epoch, self.cursor = 0, 0
        self._rows = None

    def rows(self) -> list[list[int]]:
        if self._rows is None or self._rows[0] != self.epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.store), generator=g).tolist()
            rows = pack_rows(self.store.lengths, order, self.cfg.context_length, self.cfg.pack_window)
            if len(rows) < self.per_step:
                raise InputError(
                    f"the training set packs into {len(rows)} rows of {self.cfg.context_length} positions; one step "
                    f"needs {self.per_step} (batch_rows x processes x grad_accum_steps)")
            self._rows = (self.epoch, rows)
        return self._rows[1]

    def next_step(self, rank: int) -> list[list[list[int]]]:
        """Sample indices for this rank: [accumulation step][row][sample]."""
        if self.cursor + self.per_step > len(self.rows()):
            self.epoch, self.cursor = self.epoch + 1, 0
        rows, R = self.rows(), self.cfg.batch_rows
        out = []
        for m in range(self.cfg.grad_accum_steps):
            start = self.cursor + (m * self.world + rank) * R
            out.append(rows[start : start + R])
        self.cursor += self.per_step
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# ---- distributed -----------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_name == "auto":
        device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = parse_device(device_name)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{d.local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        d.started = True
    return d, device


def _in_sync(params: list[torch.Tensor], d: Dist) -> bool:
    """True when every rank holds exactly rank 0's parameters (a DDP sanity check)."""
    if d.world == 1:
        return True
    ok = torch.ones(1, device=params[0].device)
    for p in params:
        ref = p.detach().clone()
        dist.broadcast(ref, 0)
        if not torch.equal(ref, p.detach()):
            ok.zero_()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# ---- checkpoints -----------------------------------------------------------------------------


def _copy_assets(src, dst: Path) -> None:
    """Tokenizer/codec files from src next to saved weights (hard links when possible)."""
    if not src:
        return
    src = resolve_checkpoint(src) if not Path(src).is_file() else Path(src)  # a hub id works too
    if src.is_file():
        shutil.copy2(src, dst / src.name)
        return
    for item in src.iterdir():
        if item.name in MODEL_FILES or (item.name.startswith("model-") and item.suffix == ".safetensors"):
            continue
        target = dst / item.name
        if target.exists() or item.name in ("checkpoints", "final"):
            continue
        if item.is_dir():
            shutil.copytree(item, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, target)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": np.random.get_state()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(output_dir: Path, step: int, model, optimizer, plan: DataPlan, cfg: TrainConfig, d: Dist,
                    history: dict) -> Path:
    final = output_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    d.barrier()
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp / "model")
        _copy_assets(cfg.copy_assets_from or cfg.init_from, tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    d.barrier()
    torch.save(_rng_state(), tmp / f"rng-{d.rank}.pt")
    d.barrier()
    if d.main:
        state = {"step": step, "data": plan.state(), "world_size": d.world, "config": dataclasses.asdict(cfg),
                 "history": history}
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _checkpoints(output_dir)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def _resume_dir(cfg: TrainConfig, output_dir: Path) -> Path | None:
    if cfg.resume in (False, None, "", "false", "no"):
        return None
    if cfg.resume in (True, "auto", "true", "latest"):
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not (path / "state.json").is_file():
        raise InputError(f"resume: {path} is not a complete checkpoint (no state.json)")
    return path


# ---- the loop --------------------------------------------------------------------------------


def _log(output_dir: Path, record: dict) -> None:
    with (output_dir / "log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _progress(step, cfg, m, lr, grad_norm, tok_s, end):
    line = (f"step {step:>6}/{cfg.max_steps}  loss {m['loss']:.4f}  text {m['text_loss']:.4f}  "
            f"audio {m['audio_loss']:.4f}  lr {lr:.2e}  grad {grad_norm:.2f}  {tok_s:,.0f} tok/s")
    print(("\r" if sys.stderr.isatty() else "") + line, end=end, file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate(model, store: SampleStore, cfg: TrainConfig, d: Dist, device, autocast) -> dict:
    rows = pack_rows(store.lengths, range(len(store)), cfg.context_length, cfg.pack_window)
    if cfg.eval_rows:
        rows = rows[: cfg.eval_rows]
    mine = rows[d.rank :: d.world]
    sums = [0.0, 0.0, 0.0, 0.0]
    for i in range(0, len(mine), cfg.batch_rows):
        batch = collate([[store[j] for j in row] for row in mine[i : i + cfg.batch_rows]], cfg.pad_id).to(device)
        with autocast():
            s = forward_sums(model, batch)
        sums = [a + b for a, b in zip(sums, (s.text_sum, s.n_text, s.audio_sum, s.n_frames))]
    t, nt, a, na = d.all_sum(sums)
    return metrics(t, int(nt), a, int(na), model.cfg.text_loss_multiplier, model.cfg.audio_loss_multiplier)


def _load_model(cfg: TrainConfig, resume: Path | None, device) -> LFM2AudioModel:
    if resume is not None:
        return LFM2AudioModel.from_pretrained(resume / "model", dtype=torch.float32, device=device)
    if cfg.init_from:
        return LFM2AudioModel.from_pretrained(cfg.init_from, dtype=torch.float32, device=device)
    model = LFM2AudioModel(LFM2AudioConfig.from_json(cfg.model_config))
    init_weights(model, cfg.init_std)  # same seed on every rank, and DDP broadcasts rank 0's anyway
    if cfg.init_encoder_from:
        from .encoder_ctc import load_pretrained_encoder

        load_pretrained_encoder(model, cfg.init_encoder_from)
    return model.to(device)


def train(config: TrainConfig | dict | str | Path) -> TrainResult:
    cfg = config if isinstance(config, TrainConfig) else (
        TrainConfig.from_dict(dict(config)) if isinstance(config, dict) else TrainConfig.from_file(config))
    cfg.validate()
    d, device = _setup_distributed(cfg.device)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, d, device)
    finally:
        torch.set_num_threads(threads)
        if d.started:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, device: torch.device) -> TrainResult:
    torch.set_flush_denormal(True)  # denormals make CPU steps erratic and up to 5x slower
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    output_dir = Path(cfg.output_dir)
    if d.main:
        output_dir.mkdir(parents=True, exist_ok=True)
    resume = _resume_dir(cfg, output_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model = _load_model(cfg, resume, device)
    model.train()
    freeze_batchnorm(model)
    dead = set(dead_parameter_names(model))
    frozen = tuple(cfg.freeze)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in dead and not (frozen and name.startswith(frozen)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise InputError("freeze leaves no parameter to train")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  eps=cfg.eps, fused=device.type == "cuda")

    store = SampleStore(cfg.train_data)
    if store.codebooks != model.cfg.codebooks:
        raise InputError(f"training data has {store.codebooks} codebooks, the model {model.cfg.codebooks}")
    val_store = SampleStore(cfg.val_data) if cfg.val_data else None
    plan = DataPlan(store, cfg, d.world)
    too_long = int((store.lengths > cfg.context_length).sum())
    if too_long and d.main:
        print(f"note: {too_long} of {len(store)} training samples exceed context_length {cfg.context_length} "
              "and are skipped", file=sys.stderr)

    step, history = 0, {}
    if resume is not None:
        state = json.loads((resume / "state.json").read_text())
        step, history = int(state["step"]), state.get("history", {})
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", map_location=device, weights_only=True))
        plan.load(state["data"])
        rng_file = resume / f"rng-{d.rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        if d.main:
            print(f"resumed from {resume} at step {step}", file=sys.stderr)

    # Every trainable parameter gets a gradient every step under DDP (unused parts run with
    # weight 0), so DDP needs neither find_unused_parameters nor a static graph.
    wrapped = TrainingModel(model, touch_all=d.world > 1, ctc_weight=cfg.ctc_weight, code_noise=cfg.code_noise,
                            self_feed=cfg.self_feed)
    if d.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    autocast = autocast_for(cfg.precision, device, say=d.main)

    alpha, beta = model.cfg.text_loss_multiplier, model.cfg.audio_loss_multiplier
    last_train, last_val = history.get("train", {}), history.get("val")
    window = {"sums": [0.0] * 4, "positions": 0.0, "time": 0.0, "steps": 0}
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [collate([[store[j] for j in row] for row in rows], cfg.pad_id)
                   for rows in plan.next_step(d.rank)]
        counts = [b.counts() for b in batches]
        n_text, n_frames, positions = d.all_sum([sum(c[0] for c in counts), sum(c[1] for c in counts),
                                                 sum(b.real_positions for b in batches)])
        scale = d.world / (alpha * n_text + beta * n_frames + 1e-6)
        local = [0.0, 0.0, 0.0, 0.0]
        for m, batch in enumerate(batches):
            sync = m == len(batches) - 1
            ctx = wrapped.no_sync() if (d.world > 1 and not sync) else nullcontext()
            with ctx:
                with autocast():
                    s = wrapped(batch.to(device))
                (s.numerator * scale).backward()
            local = [x + y for x, y in zip(local, (s.text_sum, s.n_text, s.audio_sum, s.n_frames))]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        sums = d.all_sum(local)
        window["sums"] = [x + y for x, y in zip(window["sums"], sums)]
        window["positions"] += positions
        window["time"] += time.perf_counter() - t0
        window["steps"] += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            t, nt, au, na = window["sums"]
            last_train = metrics(t, int(nt), au, int(na), alpha, beta)
            last_train.update(step=step, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=window["positions"] / max(window["time"], 1e-9),
                              s_per_step=window["time"] / window["steps"])
            if d.main:
                _progress(step, cfg, last_train, lr, grad_norm, last_train["tokens_per_s"], "\n")
                _log(output_dir, {"train": last_train})
            window = {"sums": [0.0] * 4, "positions": 0.0, "time": 0.0, "steps": 0}
        elif d.main and sys.stderr.isatty():
            t, nt, au, na = sums
            _progress(step, cfg, metrics(t, int(nt), au, int(na), alpha, beta), lr, grad_norm,
                      positions / max(time.perf_counter() - t0, 1e-9), "")
        if val_store is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            last_val = evaluate(model, val_store, cfg, d, device, autocast)
            last_val["step"] = step
            if d.main:
                print(f"step {step:>6}/{cfg.max_steps}  val loss {last_val['loss']:.4f}  text "
                      f"{last_val['text_loss']:.4f}  audio {last_val['audio_loss']:.4f}", file=sys.stderr, flush=True)
                _log(output_dir, {"val": last_val})
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save_checkpoint(output_dir, step, model, optimizer, plan, cfg, d, {"train": last_train, "val": last_val})

    in_sync = _in_sync([p for p in model.parameters()], d)
    final = output_dir / "final"
    if d.main:
        _log(output_dir, {"done": {"step": step, "ranks_in_sync": in_sync, "world_size": d.world}})
        shutil.rmtree(final, ignore_errors=True)
        model.save_pretrained(final)
        _copy_assets(cfg.copy_assets_from or cfg.init_from, final)
    d.barrier()
    if not in_sync:
        raise RuntimeError("data-parallel ranks ended with different weights")
    return TrainResult(model, final, step, last_train, last_val)


def main(argv: list[str] | None = None) -> int:
    """`train CONFIG [key=value ...]`: train or fine-tune from a JSON/TOML config."""
    config = config_arguments("lfm2-audio train", main.__doc__, "TrainConfig", argv)
    try:
        result = train(TrainConfig.from_dict(load_config_file(*config)))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.step} steps; final model in {result.final_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

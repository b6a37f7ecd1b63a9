"""Configuration: dataclasses mirroring the official `config.json` schema.

Reading is tolerant: keys we do not know are kept (and written back) and reported with a
warning, because the official repos have edited their configs after release. Values that the
reference hard-codes outside the config live here as module constants.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

# Hard-coded in the official implementation, not in config.json.
AUDIO_CODES = 2048  # real codes per codebook
END_OF_AUDIO = 2048  # extra code that ends an audio segment
AUDIO_VOCAB = AUDIO_CODES + 1  # classes per codebook
VOCODERS = ("hifigan", "griffin-lim")  # what the demo model's mel codec can vocode with
QUANT_MODES = ("int8", "int8-dyn", "int4")  # model/quantize.py's modes (--quantize)
WORKERS = {"auto": None, "process": True, "thread": False}  # --codec-worker / --engine-worker -> ServeConfig
MODALITY_TEXT, MODALITY_AUDIO_IN, MODALITY_AUDIO_OUT = 1, 2, 3

DEPTH_HEADS, DEPTH_KV_HEADS, DEPTH_ROPE_THETA, DEPTH_NORM_EPS = 32, 8, 1_000_000.0, 1e-5


def _round_up(x: int, multiple: int) -> int:
    return multiple * ((x + multiple - 1) // multiple)


# Keys of this project's own that official configs lack: kept in `extra` (so config.json
# round-trips and official files stay as they are) without the unknown-key warning.
OWN_KEYS = {"preprocessor": {"trim_silence"}, "top level": {"audio_sampling", "asr_decoding"}}


def _split_known(cls, data: dict, where: str, warn: bool = True) -> tuple[dict, dict]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    unknown = sorted(set(extra) - OWN_KEYS.get(where, set()))
    if unknown and warn:
        warnings.warn(f"config {where}: ignoring unknown keys {unknown}", stacklevel=3)
    return known, extra


def _to_dict(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        v = getattr(obj, f.name)
        out[f.name] = v.to_dict() if hasattr(v, "to_dict") else v
    out.update(obj.extra)
    return out


@dataclass
class PreprocessorConfig:
    sample_rate: int = 16000
    normalize: str = "per_feature"
    window_size: float = 0.025
    window_stride: float = 0.01
    window: str = "hann"
    features: int = 128
    n_fft: int = 512
    log: bool = True
    frame_splicing: int = 1
    dither: float = 1e-5
    pad_to: int = 0
    pad_value: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def hop_length(self) -> int:
        return int(round(self.window_stride * self.sample_rate))

    @property
    def win_length(self) -> int:
        return int(round(self.window_size * self.sample_rate))

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessorConfig":
        known, extra = _split_known(cls, d, "preprocessor")
        cfg = cls(**known, extra=extra)
        if cfg.normalize != "per_feature" or cfg.window != "hann" or not cfg.log:
            raise InputError("preprocessor: only normalize=per_feature, window=hann, log=true are supported")
        if cfg.frame_splicing != 1 or cfg.pad_to != 0:
            raise InputError("preprocessor: frame_splicing must be 1 and pad_to 0")
        return cfg

    to_dict = _to_dict


@dataclass
class ConformerConfig:
    feat_in: int = 128
    feat_out: int = -1
    n_layers: int = 17
    d_model: int = 512
    subsampling: str = "dw_striding"
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    causal_downsampling: bool = False
    reduction: Any = None
    reduction_position: Any = None
    reduction_factor: int = 1
    ff_expansion_factor: int = 4
    self_attention_model: str = "rel_pos"
    n_heads: int = 8
    att_context_size: list = field(default_factory=lambda: [-1, -1])
    xscaling: bool = False
    untie_biases: bool = True
    pos_emb_max_len: int = 5000
    conv_kernel_size: int = 9
    conv_norm_type: str = "batch_norm"
    conv_context_size: Any = None
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.0
    dropout_att: float = 0.1
    extra: dict = field(default_factory=dict)

    @property
    def n_subsampling_stages(self) -> int:
        return int(math.log2(self.subsampling_factor))

    @classmethod
    def from_dict(cls, d: dict) -> "ConformerConfig":
        known, extra = _split_known(cls, d, "encoder")
        cfg = cls(**known, extra=extra)
        unsupported = []
        if cfg.subsampling != "dw_striding" or cfg.causal_downsampling:
            unsupported.append("subsampling (only non-causal dw_striding)")
        if cfg.subsampling_factor not in (2, 4, 8, 16):
            unsupported.append("subsampling_factor")
        if cfg.self_attention_model != "rel_pos":
            unsupported.append("self_attention_model (only rel_pos)")
        if cfg.reduction is not None:
            unsupported.append("reduction")
        if cfg.conv_norm_type != "batch_norm":
            unsupported.append("conv_norm_type (only batch_norm)")
        if list(cfg.att_context_size) != [-1, -1]:
            unsupported.append("att_context_size (only full context)")
        if cfg.feat_out not in (-1, None) or not cfg.untie_biases:
            unsupported.append("feat_out / tied biases")
        if unsupported:
            raise InputError("encoder config: unsupported " + ", ".join(unsupported))
        return cfg

    to_dict = _to_dict


@dataclass
class Lfm2Config:
    """The LFM2 backbone (a subset of transformers' Lfm2Config; other keys pass through)."""

    vocab_size: int = 65536
    hidden_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 128000
    norm_eps: float = 1e-5
    conv_bias: bool = False
    conv_L_cache: int = 3
    intermediate_size: int = 12288
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: float | None = 1.0
    block_auto_adjust_ff_dim: bool = True
    rope_theta: float = 1_000_000.0
    layer_types: list | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 7
    pad_token_id: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.layer_types is None:
            attn = self.extra.get("full_attn_idxs", [2, 5, 8, 10, 12, 14])
            self.layer_types = ["full_attention" if i in attn else "conv" for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise InputError(f"lfm config: {len(self.layer_types)} layer_types for {self.num_hidden_layers} layers")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_dim(self) -> int:
        ff = self.intermediate_size
        if self.block_auto_adjust_ff_dim:
            ff = int(2 * ff / 3)
            if self.block_ffn_dim_multiplier is not None:
                ff = _round_up(int(self.block_ffn_dim_multiplier * ff), self.block_multiple_of)
        return ff

    def is_attention(self, i: int) -> bool:
        return self.layer_types[i] != "conv"

    @classmethod
    def from_dict(cls, d: dict) -> "Lfm2Config":
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        # Any Lfm2Config key is legal here; keep the ones we do not model without warning.
        known, extra = _split_known(cls, d, "lfm", warn=False)
        return cls(**known, extra=extra)

    to_dict = _to_dict


@dataclass
class DepthformerConfig:
    layers: int = 6
    dim: int = 1024
    tie: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.dim // DEPTH_HEADS

    @property
    def ffn_dim(self) -> int:
        return _round_up(int(2 * 4 * self.dim / 3), 256)

    @classmethod
    def from_dict(cls, d: dict) -> "DepthformerConfig":
        known, extra = _split_known(cls, d, "depthformer")
        return cls(**known, extra=extra)

    to_dict = _to_dict


@dataclass
class LFM2AudioConfig:
    architectures: list = field(default_factory=lambda: ["Lfm2AudioForConditionalGeneration"])
    codebooks: int = 8
    tie_audio_embeddings: bool = False
    semantic_codebook_factor: float = 100.0
    codebook_weight: str = "log"
    text_loss_multiplier: float = 1.0
    audio_loss_multiplier: float = 1.0
    interleaved_n_text: int = 6
    interleaved_n_audio: int = 12
    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    encoder: ConformerConfig = field(default_factory=ConformerConfig)
    lfm: Lfm2Config = field(default_factory=Lfm2Config)
    depthformer: DepthformerConfig = field(default_factory=DepthformerConfig)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "LFM2AudioConfig":
        if not isinstance(d, dict):
            raise InputError("config.json must hold a JSON object")
        d = dict(d)
        parts = {
            "preprocessor": PreprocessorConfig.from_dict(d.pop("preprocessor", {}) or {}),
            "encoder": ConformerConfig.from_dict(d.pop("encoder", {}) or {}),
            "lfm": Lfm2Config.from_dict(d.pop("lfm", {}) or {}),
            "depthformer": DepthformerConfig.from_dict(d.pop("depthformer", {}) or {}),
        }
        known, extra = _split_known(cls, d, "top level")
        cfg = cls(**known, **parts, extra=extra)
        if cfg.codebook_weight not in ("log", "linear"):
            raise InputError(f"codebook_weight must be 'log' or 'linear', got {cfg.codebook_weight!r}")
        if cfg.interleaved_n_text < 1 or cfg.interleaved_n_audio < 1:
            raise InputError("interleaved_n_text and interleaved_n_audio must be >= 1")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "LFM2AudioConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    to_dict = _to_dict

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def max_context(self) -> int:
        return self.lfm.max_position_embeddings


def official_config() -> LFM2AudioConfig:
    """LFM2-Audio-1.5B at official size (untied audio head, tied depth heads)."""
    return LFM2AudioConfig(depthformer=DepthformerConfig(tie=True))

"""LFM2-Audio: the backbone with its audio encoder, audio-output embedding and depthformer.

State-dict names and shapes are the official `model.safetensors` ones. Loading is strict and
streams tensors one at a time into the target dtype, so peak memory stays near one model copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import AUDIO_VOCAB, END_OF_AUDIO, LFM2AudioConfig
from ..errors import InputError
from ..weights import check_tensors, empty_modules, read_tensors, tensor_shapes
from ..generation.sampling import GREEDY, Sampling, sample
from .conformer import ConformerEncoder, pad_clips, subsampled_length
from .depthformer import Depthformer, SharedEmbedding
from .lfm2 import Lfm2Model

# In official files but derived from the config: recomputed, never loaded.
DERIVED_KEYS = ("codebook_offsets", "audio_loss_weights")
# Dead weights (the audio-embedding output head is never used): loaded when present.
OPTIONAL_PREFIXES = ("audio_embedding.embedding_norm.", "audio_embedding.to_logits.")


class AudioAdapter(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.model = nn.Sequential(nn.LayerNorm(d_in, eps=1e-5), nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))

    def forward(self, x):
        return self.model(x)


class LFM2AudioModel(nn.Module):
    def __init__(self, cfg: LFM2AudioConfig):
        super().__init__()
        self.cfg = cfg
        d, K, dd = cfg.lfm.hidden_size, cfg.codebooks, cfg.depthformer.dim
        self.lfm = Lfm2Model(cfg.lfm)
        self.conformer = ConformerEncoder(cfg.encoder)
        self.audio_adapter = AudioAdapter(cfg.encoder.d_model, d)
        self.audio_embedding = SharedEmbedding(K * AUDIO_VOCAB, d, cfg.tie_audio_embeddings)
        self.depth_linear = nn.Linear(d, K * dd)
        self.depthformer = Depthformer(cfg.depthformer)
        self.depth_embeddings = nn.ModuleList(SharedEmbedding(AUDIO_VOCAB, dd, cfg.depthformer.tie) for _ in range(K))
        self.register_buffer("codebook_offsets", torch.tensor([k * AUDIO_VOCAB for k in range(K)]), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lfm.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lfm.embed_tokens.weight.device

    # ---- inputs -> backbone embeddings ------------------------------------------------------

    def encode_audio(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Log-mel clips, each [n_mels, T_i] -> adapter outputs [sum ceil(T_i / 8), hidden]."""
        if not features:
            return torch.zeros(0, self.cfg.lfm.hidden_size, dtype=self.dtype, device=self.device)
        return run_encoder(self.conformer, self.audio_adapter, features, self.dtype, self.device)

    def embed_audio_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """Frames [..., K] of codes in [0, 2048] -> sum of their rows [..., hidden]."""
        return self.audio_embedding.embedding(codes + self.codebook_offsets).sum(-2)

    def embed_inputs(self, text: torch.Tensor, audio_in: torch.Tensor, audio_out: torch.Tensor,
                     modality: torch.Tensor) -> torch.Tensor:
        """Scatter text embeddings, encoded audio-in vectors [N_in, D] and audio-out frames
        [N_out, K] into one [L, D] sequence following the modality flags (1/2/3)."""
        counts = [int((modality == m).sum()) for m in (1, 2, 3)]
        if sum(counts) != modality.numel() or counts != [text.numel(), audio_in.shape[0], audio_out.shape[0]]:
            raise InputError(f"modality flags (text/audio-in/audio-out counts {counts}) do not match the inputs "
                             f"({text.numel()}, {audio_in.shape[0]}, {audio_out.shape[0]}), or hold values other than 1-3")
        out = torch.empty(modality.shape[0], self.cfg.lfm.hidden_size, dtype=self.dtype, device=self.device)
        out[modality == 1] = self.lfm.embed_tokens(text)
        out[modality == 2] = audio_in.to(self.dtype)
        out[modality == 3] = self.embed_audio_frames(audio_out)
        return out

    # ---- heads ------------------------------------------------------------------------------

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lfm.text_logits(h)

    def depth_inputs(self, h: torch.Tensor) -> torch.Tensor:
        return self.depth_linear(h).unflatten(-1, (self.cfg.codebooks, self.cfg.depthformer.dim))

    def sample_frame(self, h: torch.Tensor, params: Sampling = GREEDY, generator=None,
                     return_logits: bool = False):
        """Backbone states [B, D] -> one audio frame [B, K] by K sequential depthformer steps.

        Only codebook 0 may end the audio: codebooks 1.. never emit the end-of-audio code (the
        reference lets them, which makes a frame no codec can decode).
        """
        K = self.cfg.codebooks
        z = self.depth_inputs(h)  # [B, K, dim]
        caches = self.depthformer.new_caches(h.shape[0], K, z.dtype, z.device)
        x = z[:, :1]
        codes, all_logits = [], []
        for k in range(K):
            o = self.depthformer(x, start=k, caches=caches)[:, -1]
            logits = self.depth_embeddings[k].get_logits(o)
            all_logits.append(logits)
            if k > 0:
                logits = logits.clone()
                logits[:, END_OF_AUDIO] = float("-inf")
            code = sample(logits, params, generator)
            codes.append(code)
            if k + 1 < K:
                x = z[:, k + 1 : k + 2] + self.depth_embeddings[k].embedding(code)[:, None]
        frame = torch.stack(codes, dim=1)
        return (frame, torch.stack(all_logits, dim=1)) if return_logits else frame

    def depth_logits_teacher_forced(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training: states [N, D] and target frames [N, K] -> logits [N, K, 2049]."""
        z = self.depth_inputs(h)
        prev = [torch.zeros_like(z[:, 0])] + [self.depth_embeddings[k].embedding(targets[:, k]) for k in range(self.cfg.codebooks - 1)]
        o = self.depthformer(z + torch.stack(prev, dim=1))
        return torch.stack([emb.get_logits(o[:, k]) for k, emb in enumerate(self.depth_embeddings)], dim=1)

    def audio_positions(self, n_mel_frames: int) -> int:
        return int(subsampled_length(n_mel_frames, self.cfg.encoder.n_subsampling_stages))

    # ---- loading / saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu", quantize: str | None = None) -> "LFM2AudioModel":
        """quantize="int8": weight-only int8 decode matmuls (model/quantize.py), for bf16."""
        directory = resolve_checkpoint(path_or_id)
        cfg = LFM2AudioConfig.from_json(directory / "config.json")
        model = load_weights(cfg, weight_files(directory), dtype=dtype, device=device)
        if quantize is not None:
            from .quantize import quantize_model

            quantize_model(model, quantize)
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cfg.save(directory / "config.json")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if str(dtype) not in names:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[str(dtype)]


def parse_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' requested but MPS is not available on this machine")
    return device


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local directory, or a hub id fetched (or found in the local cache) by huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{path} is a file; pass the checkpoint directory")
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise InputError(f"{text} is neither a checkpoint directory nor a hub id like 'LiquidAI/LFM2-Audio-1.5B'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.jinja", "audio_detokenizer/*"]))
    except Exception as e:  # the hub client raises many types; the user needs the reason
        raise InputError(f"could not fetch {text} from the hub: {e}") from None


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    single = directory / "model.safetensors"
    if not single.exists():
        raise InputError(f"{directory} has no model.safetensors")
    return [single]


def _file_shapes(files: list[Path]) -> dict[str, tuple[tuple, Path]]:
    return {k: (shape, f) for f in files for k, shape in tensor_shapes(f).items()}


def load_weights(cfg: LFM2AudioConfig, files: list[Path], dtype=None, device="cpu") -> LFM2AudioModel:
    dtype, device = parse_dtype(dtype), parse_device(device)
    in_file = _file_shapes(files)
    # A file with its own depth heads wins over a config that says they are tied (the LFM2 v1
    # config's tying flag is uncertain; the tensors are not).
    if cfg.depthformer.tie and "depth_embeddings.0.to_logits.weight" in in_file:
        cfg.depthformer.tie = False
    if cfg.tie_audio_embeddings and "audio_embedding.to_logits.weight" in in_file:
        cfg.tie_audio_embeddings = False
    with empty_modules():
        model = LFM2AudioModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: shape for k, (shape, _) in in_file.items()}
    check_tensors(expected, found, "checkpoint does not match config.json", optional=OPTIONAL_PREFIXES, ignored=DERIVED_KEYS)

    state = {}
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        if k in in_file:
            by_file.setdefault(in_file[k][1], []).append(k)
    for f, keys in by_file.items():
        state.update(read_tensors(f, keys, dtype, device))
    target_dtype = dtype or next(iter(t for t in state.values() if t.is_floating_point())).dtype
    for k in expected:
        if k not in state:  # dead output head of the audio embedding, absent from the file
            shape = expected[k]
            state[k] = (torch.ones if k.endswith("embedding_norm.weight") else torch.zeros)(shape, dtype=target_dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    model.codebook_offsets = torch.arange(cfg.codebooks, device=device) * AUDIO_VOCAB
    return model.eval()


def run_encoder(conformer, adapter, features: list[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """Log-mel clips through a conformer and adapter in `dtype`, the clips' valid frames joined."""
    x, out_lens = conformer(*pad_clips(features, dtype, device))
    return adapter(torch.cat([x[i, : int(n)] for i, n in enumerate(out_lens)]))


@torch.no_grad()
def random_model(cfg: LFM2AudioConfig, dtype=torch.float32, device="cpu", seed: int = 0) -> LFM2AudioModel:
    """A model with random weights (norms at one, BatchNorm at identity): for tests, benchmarks
    and as the starting point of training from scratch."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LFM2AudioModel(cfg).to(dtype)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name or name.endswith(".bias")):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0.0, 0.02)
    return model.eval()

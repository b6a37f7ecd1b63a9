"""Training data: conversations -> training samples (spec §9.2) -> shards on disk -> packed rows.

A conversation is a list of `Message`s; each holds segments (`Text`, `Audio`, `Interleaved`).
`map_conversation` turns one into a `Sample`: the same positions the inference prompt
(generation/chat.py) would build, plus the assistant's reply, and a mask of what is supervised.

Running the codec and the mel front end is the slow part of data preparation, so samples are
computed once (`precompute`) and stored as safetensors shards; training reads them back by
slicing (memory-mapped, one sample at a time) and packs several into each row (`pack_rows`,
`collate`) instead of padding every sample to the full context.

Audio-in features: the reference training mapper keeps only the `valid` mel frames, but
inference (the reference's and ours) feeds T = valid + 1 frames (a zeroed terminal frame),
which can add one audio-in position (spec §13.1). We default to the inference layout so that a
fine-tuned model sees at training time exactly the input it will get when used;
`audio_in_frames="valid"` reproduces the reference mapper.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..audio.features import log_mel
from ..audio.io import load_audio
from ..config import AUDIO_CODES, END_OF_AUDIO, MODALITY_AUDIO_IN, MODALITY_AUDIO_OUT, MODALITY_TEXT, LFM2AudioConfig
from ..errors import InputError
from ..model.conformer import subsampled_length
from ..processor import Tokenizer

ROLES = ("system", "user", "assistant")
AUDIO_IN_FRAMES = ("inference", "valid")
FORMAT = "lfm2-audio-samples"
FORMAT_VERSION = 1


# ---- conversations ---------------------------------------------------------------------------


@dataclass
class Text:
    text: str


@dataclass
class Audio:
    """A clip: a path, the bytes of an audio file, or samples (array/tensor, then give the rate).
    transcript: the words spoken in a user clip, when known; the trainer's auxiliary CTC loss
    uses it (an ASR sample's reply already is its clip's transcript)."""

    source: object
    sample_rate: int | None = None
    transcript: str | None = None


@dataclass
class Interleaved:
    """Assistant speech with its text, laid out as alternating text / audio chunks (chat mode)."""

    text: str
    audio: Audio


@dataclass
class Message:
    role: str
    content: list = field(default_factory=list)  # of Text | Audio | Interleaved (a str means Text)


Conversation = list  # of Message


# ---- samples ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One training sample, in the layout `LFM2AudioModel.embed_inputs` takes."""

    text: torch.Tensor  # [N_text] int64, the ids of the TEXT positions in order
    audio_in: list  # of [n_mels, T_i] float32 log-mel clips, in order
    audio_out: torch.Tensor  # [N_frames, K] int64, codes in [0, 2048]
    modality: torch.Tensor  # [L] int64: 1 text, 2 audio-in, 3 audio-out
    supervised: torch.Tensor  # [L] bool
    transcripts: list = field(default_factory=list)  # per audio_in clip: token ids of its Audio.transcript, or None

    def __len__(self) -> int:
        return int(self.modality.shape[0])

    def validate(self, subsampling_stages: int = 3) -> None:
        m = self.modality
        if m.dim() != 1 or self.supervised.shape != m.shape:
            raise InputError("sample: modality and supervised must be 1-D of the same length")
        if int((m == MODALITY_TEXT).sum()) != self.text.numel():
            raise InputError("sample: number of TEXT positions != number of text ids")
        if int((m == MODALITY_AUDIO_OUT).sum()) != self.audio_out.shape[0]:
            raise InputError("sample: number of AUDIO_OUT positions != number of audio-out frames")
        n_in = sum(int(subsampled_length(f.shape[-1], subsampling_stages)) for f in self.audio_in)
        if int((m == MODALITY_AUDIO_IN).sum()) != n_in:
            raise InputError("sample: number of AUDIO_IN positions != encoded length of the audio-in clips")
        if self.audio_out.numel() and (self.audio_out.min() < 0 or self.audio_out.max() > END_OF_AUDIO):
            raise InputError(f"sample: audio-out codes must be in [0, {END_OF_AUDIO}]")


class _Builder:
    """Accumulates positions piece by piece, as the inference Conversation does."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.text: list[int] = []
        self.audio_in: list[torch.Tensor] = []
        self.audio_out: list[torch.Tensor] = []
        self.transcripts: list = []
        self.modality: list[int] = []
        self.supervised: list[bool] = []

    def add_ids(self, ids: list[int], supervised: bool) -> None:
        self.text += ids
        self.modality += [MODALITY_TEXT] * len(ids)
        self.supervised += [supervised] * len(ids)

    def add_text(self, text: str, supervised: bool) -> None:
        # One encode call per piece: BPE merges never cross piece boundaries, like inference.
        self.add_ids(self.tok.encode(text), supervised)

    def add_audio_in(self, features: torch.Tensor, positions: int, transcript: str | None = None) -> None:
        self.audio_in.append(features)
        self.transcripts.append(None if not transcript else torch.tensor(self.tok.encode(transcript), dtype=torch.int64))
        self.modality += [MODALITY_AUDIO_IN] * positions
        self.supervised += [False] * positions

    def add_frames(self, frames: torch.Tensor) -> None:
        self.audio_out.append(frames)
        self.modality += [MODALITY_AUDIO_OUT] * frames.shape[0]
        self.supervised += [True] * frames.shape[0]

    def build(self, codebooks: int) -> Sample:
        return Sample(
            text=torch.tensor(self.text, dtype=torch.int64),
            audio_in=self.audio_in,
            audio_out=torch.cat(self.audio_out) if self.audio_out else torch.zeros(0, codebooks, dtype=torch.int64),
            modality=torch.tensor(self.modality, dtype=torch.int64),
            supervised=torch.tensor(self.supervised, dtype=torch.bool),
            transcripts=self.transcripts,
        )


def _as_message(m) -> Message:
    if isinstance(m, Message):
        return m
    if isinstance(m, dict) and "role" in m:
        return Message(m["role"], m.get("content", []))
    raise InputError(f"a conversation holds Message objects, got {type(m).__name__}")


def _segments(content) -> list:
    if isinstance(content, (str, Text, Audio, Interleaved)):
        content = [content]
    if not isinstance(content, (list, tuple)):
        raise InputError(f"message content must be a list of segments, got {type(content).__name__}")
    return [Text(s) if isinstance(s, str) else s for s in content]


@dataclass
class SilencePadding:
    """Random silence around user clips, added before the front end.

    Synthetic clips are trimmed, but people pause before and after they speak, and the
    front end normalises each clip over all its frames, so silence changes every feature: a
    model that never met it answers a question after 2 s of silence with nonsense. Each clip
    draws its padding from a hash of its samples and `seed`, so a rerun writes the same set.
    """

    probability: float = 0.5  # share of clips padded
    max_lead: float = 2.5  # seconds, drawn uniformly from [0, max]
    max_trail: float = 1.5
    noise_probability: float = 0.5  # of the padded clips, share with a noise floor (else digital silence)
    noise_dbfs: tuple = (-70.0, -45.0)  # the floor's level, drawn uniformly; it lies under the speech too
    seed: int = 0

    def __post_init__(self):
        if not (0 <= self.probability <= 1 and 0 <= self.noise_probability <= 1):
            raise InputError("silence padding: probabilities must lie in [0, 1]")
        if self.max_lead < 0 or self.max_trail < 0:
            raise InputError("silence padding: max_lead and max_trail must be >= 0 seconds")


def pad_with_silence(wave: np.ndarray, sample_rate: int, pad: SilencePadding) -> np.ndarray:
    wave = np.ascontiguousarray(wave, np.float32)
    rng = np.random.default_rng([pad.seed, zlib.crc32(wave.tobytes())])
    if rng.random() >= pad.probability:
        return wave
    lead, trail = (int(rng.uniform(0, s) * sample_rate) for s in (pad.max_lead, pad.max_trail))
    out = np.concatenate([np.zeros(lead, np.float32), wave, np.zeros(trail, np.float32)])
    if rng.random() < pad.noise_probability:
        level = 10 ** (rng.uniform(*pad.noise_dbfs) / 20)
        out += rng.standard_normal(out.size).astype(np.float32) * np.float32(level)
    return out


def audio_in_features(audio: Audio, cfg: LFM2AudioConfig, audio_in_frames: str = "inference",
                      silence: SilencePadding | None = None) -> torch.Tensor:
    """A user/system clip -> log-mel [n_mels, T] as the encoder will see it."""
    if audio_in_frames not in AUDIO_IN_FRAMES:
        raise InputError(f"audio_in_frames must be one of {AUDIO_IN_FRAMES}, got {audio_in_frames!r}")
    pre = cfg.preprocessor
    wave = load_audio(audio.source, sample_rate=audio.sample_rate, target_rate=pre.sample_rate)
    if silence is not None:
        wave = pad_with_silence(wave, pre.sample_rate, silence)
    feats, valid = log_mel(torch.from_numpy(np.ascontiguousarray(wave)), pre)
    return feats if audio_in_frames == "inference" else feats[:, :valid].contiguous()


def audio_out_frames(audio: Audio, codec, codebooks: int) -> torch.Tensor:
    """An assistant clip -> codec frames [T, K] followed by one end-of-audio frame."""
    if codec is None:
        raise InputError("the conversation has assistant audio: a codec (with encode) is needed to map it")
    if getattr(codec, "can_encode", True) is False:
        raise InputError(f"{type(codec).__name__} cannot encode audio; use a codec with an encoder (e.g. Mimi)")
    wave = load_audio(audio.source, sample_rate=audio.sample_rate, target_rate=codec.sample_rate)
    x = torch.from_numpy(np.ascontiguousarray(wave))[None]
    device = getattr(codec, "device", None)
    with torch.no_grad():
        codes = codec.encode(x.to(device) if device is not None else x)
    codes = torch.as_tensor(codes).detach().cpu().long()
    if codes.dim() != 3 or codes.shape[0] != 1 or codes.shape[1] < codebooks:
        raise InputError(f"codec.encode returned shape {tuple(codes.shape)}; expected [1, >= {codebooks}, T]")
    frames = codes[0, :codebooks].T.contiguous()  # [T, K]
    if frames.numel() and (frames.min() < 0 or frames.max() >= AUDIO_CODES):
        raise InputError(f"codec produced codes outside [0, {AUDIO_CODES - 1}]")
    eoa = torch.full((1, codebooks), END_OF_AUDIO, dtype=torch.int64)
    return torch.cat([frames, eoa])


def interleave(n_tokens: int, n_frames: int, n_text: int, n_audio: int) -> list[tuple[int, int]]:
    """Runs (modality, count) of the interleaved layout: [<= n_text TEXT][<= n_audio AUDIO_OUT]
    repeated until both streams are used up; a stream that runs out just stops taking turns."""
    runs, t, a = [], 0, 0
    while t < n_tokens or a < n_frames:
        for mod, n, left in ((MODALITY_TEXT, n_text, n_tokens - t), (MODALITY_AUDIO_OUT, n_audio, n_frames - a)):
            take = min(n, left)
            if take == 0:
                continue
            if runs and runs[-1][0] == mod:
                runs[-1] = (mod, runs[-1][1] + take)
            else:
                runs.append((mod, take))
            if mod == MODALITY_TEXT:
                t += take
            else:
                a += take
    return runs


def map_conversation(conversation, tokenizer: Tokenizer, cfg: LFM2AudioConfig, codec=None,
                     audio_in_frames: str = "inference", silence: SilencePadding | None = None) -> Sample:
    """One conversation -> one training sample (spec §9.2). `silence` pads the user clips.

    Supervised: the assistant's text, `<|audio_start|>`, audio frames (with their end-of-audio
    frame) and its `<|im_end|>\\n`. Never supervised: `<|startoftext|>`, `<|im_start|>{role}\\n`,
    anything in system/user turns.
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InputError("a conversation must be a non-empty list of messages")
    K, stages = cfg.codebooks, cfg.encoder.n_subsampling_stages
    b = _Builder(tokenizer)
    b.add_ids([tokenizer.bos_id], False)
    for message in map(_as_message, conversation):
        if message.role not in ROLES:
            raise InputError(f"role must be one of {ROLES}, got {message.role!r}")
        sup = message.role == "assistant"
        b.add_text(f"<|im_start|>{message.role}\n", False)
        for seg in _segments(message.content):
            if isinstance(seg, Text):
                b.add_text(seg.text, sup)
            elif isinstance(seg, Audio) and not sup:
                feats = audio_in_features(seg, cfg, audio_in_frames, silence)
                b.add_audio_in(feats, int(subsampled_length(feats.shape[-1], stages)), seg.transcript)
            elif isinstance(seg, Audio):
                b.add_ids([tokenizer.audio_start_id], True)
                b.add_frames(audio_out_frames(seg, codec, K))
            elif isinstance(seg, Interleaved):
                if not sup:
                    raise InputError("interleaved text+audio segments belong to assistant messages only")
                # text and <|text_end|> in ONE encode call, as the reference mapper does (§13.22)
                ids = tokenizer.encode(seg.text + "<|text_end|>")
                frames = audio_out_frames(seg.audio, codec, K)
                t = a = 0
                for mod, n in interleave(len(ids), frames.shape[0], cfg.interleaved_n_text, cfg.interleaved_n_audio):
                    if mod == MODALITY_TEXT:
                        b.add_ids(ids[t : t + n], True)
                        t += n
                    else:
                        b.add_frames(frames[a : a + n])
                        a += n
            else:
                raise InputError(f"unknown segment type {type(seg).__name__}; use Text, Audio or Interleaved")
        b.add_text("<|im_end|>\n", sup)
    sample = b.build(K)
    sample.validate(stages)
    return sample


# ---- conversations from JSONL ----------------------------------------------------------------


def _segment_from_json(seg, base: Path):
    if isinstance(seg, str):
        return Text(seg)
    if not isinstance(seg, dict):
        raise InputError(f"segment must be a string or an object, got {seg!r}")
    kind = seg.get("type") or ("interleaved" if "text" in seg and "path" in seg else "audio" if "path" in seg else "text")
    if kind == "text":
        return Text(seg["text"])
    path = seg.get("path")
    if not isinstance(path, str):
        raise InputError(f"{kind} segment needs a 'path' string: {seg!r}")
    audio = Audio(str(base / path), transcript=seg.get("transcript"))
    if kind == "audio":
        return audio
    if kind == "interleaved":
        return Interleaved(seg["text"], audio)
    raise InputError(f"unknown segment type {kind!r}")


def read_conversations(path) -> Iterator[list[Message]]:
    """Conversations from a JSONL file, one per line:

        {"messages": [{"role": "system", "content": "Perform ASR."},
                      {"role": "user", "content": [{"type": "audio", "path": "clips/a.wav"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]}

    Segments: a string (text), {"type": "text", "text"}, {"type": "audio", "path"} (optionally
    with "transcript", the words spoken in a user clip), {"type": "interleaved", "text", "path"}.
    Paths are relative to the JSONL file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"conversation file not found: {path}")
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON: {e}") from None
            messages = row.get("messages") if isinstance(row, dict) else row
            if not isinstance(messages, list):
                raise InputError(f"{path}:{n}: expected {{'messages': [...]}}")
            try:
                yield [Message(m["role"], [_segment_from_json(s, path.parent) for s in _segments_json(m.get("content", []))])
                       for m in messages]
            except (KeyError, TypeError) as e:
                raise InputError(f"{path}:{n}: malformed message ({e})") from None


def _segments_json(content):
    return [content] if isinstance(content, (str, dict)) else content


# ---- shards on disk --------------------------------------------------------------------------
# One safetensors file per shard holds its samples concatenated along time, plus a per-sample
# count table; reading slices that table's offsets out of the memory-mapped file.

_COUNTS = ("positions", "text", "clips", "frames")


class SampleWriter:
    def __init__(self, out_dir, codebooks: int, n_mels: int, shard_size: int = 1000, meta: dict | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / "index.json").exists():
            raise InputError(f"{self.dir} already holds a sample set; choose an empty directory")
        self.K, self.n_mels, self.shard_size = codebooks, n_mels, shard_size
        self.meta = dict(meta or {})
        self.pending: list[Sample] = []
        self.shards: list[dict] = []

    def add(self, sample: Sample) -> None:
        if sample.audio_out.shape[1] != self.K:
            raise InputError(f"sample has {sample.audio_out.shape[1]} codebooks, the set {self.K}")
        self.pending.append(sample)
        if len(self.pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        s = self.pending
        clips = [c for x in s for c in x.audio_in]
        said = [t for x in s for t in _per_clip(x.transcripts, len(x.audio_in))]
        tensors = {
            "counts": torch.tensor([[len(x), x.text.numel(), len(x.audio_in), x.audio_out.shape[0]] for x in s], dtype=torch.int64),
            "text": torch.cat([x.text for x in s]).to(torch.int32),
            "clip_frames": torch.tensor([c.shape[-1] for c in clips], dtype=torch.int64),
            # time-major so one sample's frames are one contiguous slice
            "audio_in": torch.cat([c.T for c in clips]).float().contiguous() if clips else torch.zeros(0, self.n_mels),
            "audio_out": torch.cat([x.audio_out for x in s]).to(torch.int16),
            "modality": torch.cat([x.modality for x in s]).to(torch.uint8),
            "supervised": torch.cat([x.supervised for x in s]).to(torch.uint8),
            # per clip: the length of its transcript's ids in "transcript_ids", -1 when it has none
            "clip_transcript_len": torch.tensor([-1 if t is None else t.numel() for t in said], dtype=torch.int64),
            "transcript_ids": torch.cat([t for t in said if t is not None] or [torch.zeros(0, dtype=torch.int64)]).to(torch.int32),
        }
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self.dir / name))
        self.shards.append({"file": name, "samples": len(s)})
        self.pending = []

    def close(self) -> None:
        self._flush()
        index = {"format": FORMAT, "version": FORMAT_VERSION, "codebooks": self.K, "n_mels": self.n_mels,
                 "shards": self.shards, **self.meta}
        (self.dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")


class SampleStore:
    """Random access to a precomputed sample set (one directory, or several concatenated)."""

    def __init__(self, paths):
        from safetensors import safe_open

        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.files, rows, lengths = [], [], []
        self.codebooks = None
        for p in map(Path, paths):
            index_file = p / "index.json"
            if not index_file.is_file():
                raise InputError(f"{p} is not a precomputed sample set (no index.json); run precompute first")
            index = json.loads(index_file.read_text())
            if index.get("format") != FORMAT:
                raise InputError(f"{index_file} is not a {FORMAT} index")
            if self.codebooks not in (None, index["codebooks"]):
                raise InputError("sample sets with different codebook counts cannot be mixed")
            self.codebooks, self.n_mels = index["codebooks"], index["n_mels"]
            for shard in index["shards"]:
                f = safe_open(str(p / shard["file"]), framework="pt")
                counts = f.get_tensor("counts")
                offsets = torch.cat([torch.zeros(1, 4, dtype=torch.int64), counts.cumsum(0)])
                clip_frames = f.get_tensor("clip_frames")
                clip_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), clip_frames.cumsum(0)])
                # sets precomputed before clip transcripts existed have none
                said = f.get_tensor("clip_transcript_len") if "clip_transcript_len" in f.keys() else None
                said_offsets = None if said is None else torch.cat([torch.zeros(1, dtype=torch.int64), said.clamp(min=0).cumsum(0)])
                self.files.append((f, offsets, clip_frames, clip_offsets, said, said_offsets))
                fi = len(self.files) - 1
                rows += [(fi, i) for i in range(counts.shape[0])]
                lengths.append(counts[:, 0].numpy())
        self.rows = rows
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)  # positions per sample

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> Sample:
        fi, i = self.rows[idx]
        f, off, clip_frames, clip_off, said, said_off = self.files[fi]
        (p0, t0, c0, a0), (p1, t1, c1, a1) = off[i].tolist(), off[i + 1].tolist()
        audio = f.get_slice("audio_in")[int(clip_off[c0]) : int(clip_off[c1])]
        clips = [c.T.contiguous() for c in torch.split(audio, clip_frames[c0:c1].tolist())] if c1 > c0 else []
        transcripts = []
        if said is not None and c1 > c0:
            ids = f.get_slice("transcript_ids")[int(said_off[c0]) : int(said_off[c1])].long()
            pieces = torch.split(ids, said[c0:c1].clamp(min=0).tolist())
            transcripts = [None if n < 0 else t for n, t in zip(said[c0:c1].tolist(), pieces)]
        return Sample(
            text=f.get_slice("text")[t0:t1].long(),
            audio_in=clips,
            audio_out=f.get_slice("audio_out")[a0:a1].long(),
            modality=f.get_slice("modality")[p0:p1].long(),
            supervised=f.get_slice("supervised")[p0:p1].bool(),
            transcripts=transcripts,
        )


def precompute(conversations: Iterable, out_dir, tokenizer: Tokenizer, cfg: LFM2AudioConfig, codec=None,
               audio_in_frames: str = "inference", max_positions: int | None = None, shard_size: int = 1000,
               progress: bool = False, silence: SilencePadding | None = None) -> dict:
    """Map conversations and store the samples under out_dir. Samples longer than max_positions
    are skipped (they could never fit a training row). Returns counts."""
    meta = {"audio_in_frames": audio_in_frames, "subsampling_factor": cfg.encoder.subsampling_factor}
    if silence is not None:
        meta["silence_padding"] = asdict(silence)
    writer = SampleWriter(out_dir, cfg.codebooks, cfg.preprocessor.features, shard_size, meta=meta)
    stats = {"written": 0, "skipped_too_long": 0, "positions": 0}
    for n, conv in enumerate(conversations, 1):
        sample = map_conversation(conv, tokenizer, cfg, codec, audio_in_frames, silence)
        if max_positions is not None and len(sample) > max_positions:
            stats["skipped_too_long"] += 1
            continue
        writer.add(sample)
        stats["written"] += 1
        stats["positions"] += len(sample)
        if progress and n % 100 == 0:
            print(f"\rprecompute: {n} conversations", end="", file=sys.stderr, flush=True)
    writer.close()
    if progress:
        print(f"\rprecompute: {stats}", file=sys.stderr)
    return stats


# ---- packing and collation -------------------------------------------------------------------


def pack_rows(lengths, order, context_length: int, window: int = 64) -> list[list[int]]:
    """Greedy first-fit: each sample (in `order`) goes into the first of the last `window` open
    rows with room for it, else starts a new row. The window bounds the cost at O(n * window)
    while keeping rows nearly full. Samples longer than context_length are left out."""
    rows: list[list[int]] = []
    room: list[int] = []
    open_from = 0  # rows before this index are closed
    for idx in order:
        n = int(lengths[idx])
        if n > context_length or n == 0:
            continue
        for r in range(open_from, len(rows)):
            if room[r] >= n:
                rows[r].append(int(idx))
                room[r] -= n
                break
        else:
            rows.append([int(idx)])
            room.append(context_length - n)
            open_from = max(open_from, len(rows) - window)
    return rows


@dataclass
class Batch:
    """Packed rows in the layout `embed_inputs` takes (flattened row-major), plus the per-position
    sample structure: `segment` (index of the sample in its row, -1 for padding) and `position`
    (offset within that sample), so attention, convolutions and the loss stay inside a sample."""

    text: torch.Tensor  # [N_text] int64, padding positions included (pad id)
    audio_in: list
    audio_out: torch.Tensor  # [N_frames, K]
    modality: torch.Tensor  # [B, L]
    supervised: torch.Tensor  # [B, L]
    segment: torch.Tensor  # [B, L]
    position: torch.Tensor  # [B, L]
    packed: bool  # some row holds more than one sample (needs block-diagonal attention)
    segment_lengths: list  # lengths of the samples and padding runs of the flattened rows, in order
    transcripts: list = field(default_factory=list)  # per audio_in clip: its transcript ids (ASR samples) or None

    def to(self, device) -> Batch:
        t = lambda x: x.to(device, non_blocking=True)
        return Batch(t(self.text), [t(c) for c in self.audio_in], t(self.audio_out), t(self.modality),
                     t(self.supervised), t(self.segment), t(self.position), self.packed, self.segment_lengths,
                     [None if x is None else t(x) for x in self.transcripts])

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks [B, L-1] of the positions t >= 1 whose token (text) / frame (audio) is a target,
        predicted from t - 1 of the same sample."""
        ok = self.supervised[:, 1:] & (self.position[:, 1:] >= 1) & (self.segment[:, 1:] >= 0)
        return ok & (self.modality[:, 1:] == MODALITY_TEXT), ok & (self.modality[:, 1:] == MODALITY_AUDIO_OUT)

    def counts(self) -> tuple[int, int]:
        text, audio = self.targets()
        return int(text.sum()), int(audio.sum())

    @property
    def real_positions(self) -> int:
        return int((self.segment >= 0).sum())


def collate(rows: list[list[Sample]], pad_id: int = 0, length: int | None = None) -> Batch:
    """Rows of samples -> one Batch, right-padded to the longest row (or `length`). Padding is
    unsupervised TEXT with the pad id, like the reference, so every position has an embedding."""
    L = length or max(sum(len(s) for s in row) for row in rows)
    K = next((s.audio_out.shape[1] for row in rows for s in row), 8)
    text, audio_in, audio_out, mod, sup, seg, pos, lengths, transcripts = [], [], [], [], [], [], [], [], []
    for row in rows:
        used = sum(len(s) for s in row)
        if used > L:
            raise InputError(f"row of {used} positions does not fit a length of {L}")
        for j, s in enumerate(row):
            text.append(s.text)
            audio_in += s.audio_in
            transcripts += clip_transcripts(s)
            audio_out.append(s.audio_out)
            mod.append(s.modality)
            sup.append(s.supervised)
            seg.append(torch.full((len(s),), j, dtype=torch.int64))
            pos.append(torch.arange(len(s)))
            lengths.append(len(s))
        n_pad = L - used
        if n_pad:
            lengths.append(n_pad)
        text.append(torch.full((n_pad,), pad_id, dtype=torch.int64))
        mod.append(torch.full((n_pad,), MODALITY_TEXT, dtype=torch.int64))
        sup.append(torch.zeros(n_pad, dtype=torch.bool))
        seg.append(torch.full((n_pad,), -1, dtype=torch.int64))
        pos.append(torch.arange(n_pad))
    B = len(rows)
    return Batch(
        text=torch.cat(text),
        audio_in=audio_in,
        audio_out=torch.cat(audio_out) if audio_out else torch.zeros(0, K, dtype=torch.int64),
        modality=torch.cat(mod).view(B, L),
        supervised=torch.cat(sup).view(B, L),
        segment=torch.cat(seg).view(B, L),
        position=torch.cat(pos).view(B, L),
        packed=any(len(row) > 1 for row in rows),
        segment_lengths=lengths,
        transcripts=transcripts,
    )


FIRST_REGULAR_ID = 134  # LFM2 tokenizers keep their special tokens below this id (spec §4)


def _per_clip(transcripts: list, n_clips: int) -> list:
    return list(transcripts) if len(transcripts) == n_clips else [None] * n_clips


def clip_transcripts(s: Sample) -> list:
    """Per audio_in clip, its transcript's token ids or None: the clip's own transcript when the
    conversation gave one, else, for an ASR sample, the reply (`asr_transcript`)."""
    out = _per_clip(s.transcripts, len(s.audio_in))
    if len(out) == 1 and out[0] is None:
        out[0] = asr_transcript(s)
    return out


def asr_transcript(s: Sample) -> torch.Tensor | None:
    """The transcript of a sample that is one clip in and text out (an ASR sample): its
    supervised text up to the first special token (the turn's <|im_end|>). None otherwise."""
    if len(s.audio_in) != 1 or s.audio_out.shape[0]:
        return None
    ids = s.text[s.supervised[s.modality == MODALITY_TEXT]]
    special = (ids < FIRST_REGULAR_ID).nonzero()
    ids = ids[: int(special[0])] if len(special) else ids
    return ids if ids.numel() else None


# ---- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`precompute CONVERSATIONS.jsonl OUT_DIR --checkpoint DIR`: map and store training samples."""
    p = argparse.ArgumentParser(prog="lfm2-audio precompute", description=main.__doc__)
    p.add_argument("conversations", help="JSONL file of conversations (see read_conversations)")
    p.add_argument("out_dir")
    p.add_argument("--checkpoint", help="model directory: config.json, tokenizer.json and its codec")
    p.add_argument("--config", help="config.json (default: the checkpoint's)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--codec", help="directory holding the codec (default: the checkpoint)")
    p.add_argument("--audio-in-frames", choices=AUDIO_IN_FRAMES, default="inference")
    p.add_argument("--max-positions", type=int, default=None, help="skip samples longer than this")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="device for the codec")
    p.add_argument("--pad-silence", type=float, default=0.0, metavar="P",
                   help="pad this share of the user clips with random silence (see SilencePadding)")
    p.add_argument("--pad-seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        silence = SilencePadding(args.pad_silence, seed=args.pad_seed) if args.pad_silence != 0 else None
        if not (args.checkpoint or (args.config and args.tokenizer)):
            raise InputError("give --checkpoint, or both --config and --tokenizer")
        cfg = LFM2AudioConfig.from_json(args.config or Path(args.checkpoint) / "config.json")
        tok = Tokenizer.from_pretrained(args.tokenizer or args.checkpoint)
        codec = _LazyCodec(args.codec or args.checkpoint, args.device) if (args.codec or args.checkpoint) else None
        stats = precompute(read_conversations(args.conversations), args.out_dir, tok, cfg, codec,
                           args.audio_in_frames, args.max_positions, args.shard_size, progress=True,
                           silence=silence)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


class _LazyCodec:
    """Loads the codec on first use, so text/ASR-only data never needs one."""

    def __init__(self, path, device):
        self.path, self.device_name, self.codec = path, device, None

    def _get(self):
        if self.codec is None:
            from ..codec import load_codec

            self.codec = load_codec(self.path, device=self.device_name)
        return self.codec

    @property
    def sample_rate(self):
        return self._get().sample_rate

    @property
    def can_encode(self):
        return getattr(self._get(), "can_encode", True)

    @property
    def device(self):
        return getattr(self._get(), "device", None)

    def encode(self, wave):
        return self._get().encode(wave)


if __name__ == "__main__":
    sys.exit(main())

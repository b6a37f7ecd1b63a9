"""Numerical parity with the official implementation's float32 outputs.

    python bench/parity.py CHECKPOINT_DIR EXPECTED_NPZ

Loads the checkpoint with this package's loader, recomputes the log-mel from `in_waveform` and
every expected array from the npz inputs, prints one line per array (relative error = norm of
the difference over the norm of the expected array; token agreement for greedy outputs) and
exits 1 if any relative error exceeds 1e-4 or any greedy token differs.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from lfm2_audio.audio.features import log_mel
from lfm2_audio.generation.chat import Conversation
from lfm2_audio.generation.generate import OFFICIAL_IDS, generate
from lfm2_audio.model.lfm2_audio import LFM2AudioModel

TOLERANCE = 1e-4


def rel_err(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    norm = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (norm if norm > 0 else 1.0))


def run_mode(model, ref, mode: str, steps: int, force: tuple[int, ...]):
    conv = Conversation(model, tokenizer=None)
    conv.pending, conv.record.modality, conv.length = [], [], 0  # the npz holds the whole prompt
    flags = ref["in_modality_flag"][0]
    text, frames = iter(ref["in_text"][0].tolist()), iter(torch.from_numpy(ref["in_audio_out"]).T)
    features = torch.from_numpy(ref["in_audio_in"])
    clips, start = [], 0
    for n in ref["in_audio_in_lens"].reshape(-1).tolist():
        clips.append(features[:, start : start + n])
        start += n
    clips = iter(clips)
    i = 0
    while i < len(flags):  # re-create the prompt piece by piece from the modality flags
        j = i
        while j < len(flags) and flags[j] == flags[i]:
            j += 1
        if flags[i] == 1:
            conv.add_tokens([next(text) for _ in range(j - i)])
        elif flags[i] == 2:
            covered = 0  # adjacent clips share one run of audio-in flags
            while covered < j - i:
                clip = next(clips)
                conv.add_features(clip)
                covered += model.audio_positions(clip.shape[-1])
        else:
            conv.add_audio_frames(torch.stack([next(frames) for _ in range(j - i)]))
        i = j
    conv.role = "assistant"
    events = [e for e in generate(conv, mode, max_new_tokens=steps, force_tokens=force, details=True) if e.kind != "end"]
    tokens = np.full((len(events), model.cfg.codebooks), -1, dtype=np.int64)
    for k, e in enumerate(events):
        if e.kind == "text":
            tokens[k, 0] = e.token
        else:
            tokens[k] = e.frame.numpy()
    is_audio = np.array([e.kind == "audio" for e in events])
    hidden = np.stack([e.hidden.float().numpy() for e in events])
    text_logits = [e.logits.float().numpy() for e in events if e.kind == "text" and e.logits is not None]
    depth_logits = [e.logits.float().numpy() for e in events if e.kind == "audio"]
    return tokens, is_audio, hidden, np.stack(text_logits) if text_logits else None, np.stack(depth_logits) if depth_logits else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("expected")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ref = dict(np.load(args.expected))
    model = LFM2AudioModel.from_pretrained(args.checkpoint, dtype="float32")
    rows: list[tuple[str, float | None, bool | None]] = []

    with torch.inference_mode():
        mel, _ = log_mel(torch.from_numpy(ref["in_waveform"]), model.cfg.preprocessor)
        rows.append(("in_audio_in (mel from in_waveform)", rel_err(mel.numpy(), ref["in_audio_in"]), None))
        lens = ref["in_audio_in_lens"].reshape(-1).tolist()
        audio_in = model.encode_audio(list(torch.from_numpy(ref["in_audio_in"]).split(lens, dim=1)))
        emb = model.embed_inputs(torch.from_numpy(ref["in_text"][0]), audio_in,
                                 torch.from_numpy(ref["in_audio_out"]).T, torch.from_numpy(ref["in_modality_flag"][0]))
        rows.append(("prefill_emb", rel_err(emb.numpy(), ref["prefill_emb"]), None))
        hidden = model.lfm(emb[None])[0]
        rows.append(("first_hidden", rel_err(hidden.numpy(), ref["first_hidden"]), None))
        logits = model.text_logits(hidden[-1])
        rows.append(("first_text_logits", rel_err(logits.numpy(), ref["first_text_logits"]),
                     int(logits.argmax()) == int(ref["first_text_token"])))
        frame, depth = model.sample_frame(hidden[-1:], return_logits=True)
        rows.append(("first_depth_logits", rel_err(depth[0].numpy(), ref["first_depth_logits"]),
                     bool((frame[0].numpy() == ref["first_audio_frame"]).all())))

        for prefix, mode, force in (("inter", "interleaved", ()), ("seque", "sequential", (OFFICIAL_IDS["audio_start"],))):
            if f"{prefix}_tokens" not in ref:
                continue
            want = ref[f"{prefix}_tokens"]
            tokens, is_audio, hid, text_lg, depth_lg = run_mode(model, ref, mode, len(want), force)
            same = tokens.shape == want.shape and bool((tokens == want).all())
            rows.append((f"{prefix}_tokens", None, same))
            rows.append((f"{prefix}_is_audio", None, is_audio.shape == ref[f"{prefix}_is_audio"].shape
                         and bool((is_audio == ref[f"{prefix}_is_audio"].astype(bool)).all())))
            rows.append((f"{prefix}_hidden", rel_err(hid, ref[f"{prefix}_hidden"]), None))
            if text_lg is not None and f"{prefix}_text_logits_raw" in ref:
                rows.append((f"{prefix}_text_logits_raw", rel_err(text_lg, ref[f"{prefix}_text_logits_raw"]), None))
            if depth_lg is not None and f"{prefix}_depth_logits" in ref:
                rows.append((f"{prefix}_depth_logits", rel_err(depth_lg, ref[f"{prefix}_depth_logits"]), None))

    failed = False
    for name, err, match in rows:
        bad = (err is not None and not err <= TOLERANCE) or match is False
        failed |= bad
        parts = [f"{name:40s}"]
        if err is not None:
            parts.append(f"rel_err {err:.3e}")
        if match is not None:
            parts.append("tokens match" if match else "TOKENS DIFFER")
        parts.append("FAIL" if bad else "ok")
        print("  ".join(parts))
    print("parity: FAIL" if failed else "parity: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

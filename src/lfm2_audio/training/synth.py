"""Synthetic English speech conversations for training and testing the demo model (issue #4).

Three tasks, each with its official system prompt (spec §7.2):

- ASR: a user clip (16 kHz) -> its transcript, capitalised and punctuated.
- TTS: a text -> speech in one of four fixed voices (24 kHz), one per official voice prompt.
- Speech-to-speech: spoken questions with one right answer (arithmetic, days and months,
  opposites, counts, colours, capitals, plurals, baby animals, comparisons), answered with
  interleaved text and speech, over one to three turns; follow-up turns ("and what is that
  plus three?") can only be answered from the earlier turns.

Speech comes from Debian's espeak-ng (`espeak-ng --stdout`, 22,050 Hz), run in a process pool
and resampled with soxr to 16 kHz (what the audio encoder takes) or 24 kHz (what the codec
takes). Sentences are WordNet's quoted gloss examples (Debian `wordnet-base`; see
WORDNET_LICENSE beside this file) plus the question family below.

The held-out test material is FIXED, whatever the seed or sizes: a sentence (or question
wording) is held out when a hash of its normalised text falls below a fraction, and a voice
(accent + variant) is held out by a hash rank within its accent. Training never uses either.
The test sets are drawn from their own seeded random streams, so the first N test records do
not change with the training sizes or with the test size asked for.

Output (read by `training.data.read_conversations`, and by `lfm2-audio eval`):

    OUT/manifest.json                     sizes, hours, voices, splits, timings
    OUT/train-00000.jsonl ...             shuffled training conversations, all three tasks
    OUT/test-asr.jsonl, test-tts.jsonl, test-s2s.jsonl
    OUT/audio/16k/ab/<hash>.flac          user speech (16-bit FLAC), named by content
    OUT/audio/24k/ab/<hash>.flac          assistant speech

Each line: {"id", "split", "task", "messages": [...], "meta": {...}} where messages are
{"role", "content"} with content a string (text) or a list of segments
{"type": "text", "text"} | {"type": "audio", "path"} | {"type": "interleaved", "text", "path"},
paths relative to OUT.

    python -m lfm2_audio.training.synth OUT --asr 20000 --tts 20000 --s2s 20000 --seed 0

Speed: about 3.5 hours of speech per minute with 2 workers on 2 cores (12,664 clips, 7.3 h, in
124 s); most of espeak-ng's time is its start-up, once per clip. Clips are FLAC, ~80 MB/hour.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..generation.chat import SYSTEM_PROMPTS, VOICES

FORMAT = "lfm2-audio-synth"
FORMAT_VERSION = 1
ESPEAK_RATE = 22050
INPUT_RATE = 16000  # the audio encoder's rate
OUTPUT_RATE = 24000  # the codec's rate
WORDNET_DIR = Path("/usr/share/wordnet")

# Fixed splits: change these and every held-out set changes, so they are not options.
HELD_OUT_SENTENCES = 0.05  # of WordNet sentences
HELD_OUT_QUESTIONS = 0.10  # of question wordings (there are fewer, and each test turn needs one)
HELD_OUT_VOICES_PER_ACCENT = 3  # of the variants of each accent

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc")
# espeak-ng 1.51 voice files for the accents. Named by file because "en-gb+f2" resolves to a
# voice that silently ignores the variant (en-gb+f2, en-gb+m1 and en-gb give identical audio);
# "gmw/en+f2" is the same British voice with the variant applied.
ESPEAK_FILES = {"en-us": "gmw/en-US", "en-gb": "gmw/en", "en-gb-scotland": "gmw/en-GB-scotland",
                "en-gb-x-rp": "gmw/en-GB-x-rp", "en-gb-x-gbclan": "gmw/en-GB-x-gbclan",
                "en-gb-x-gbcwmd": "gmw/en-GB-x-gbcwmd", "en-029": "gmw/en-029", "en-us-nyc": "gmw/en-US-nyc"}
# Human-sounding variants (the robots, whisperers and demons of espeak's list are left out).
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt2",
            "klatt3", "Andy", "Annie", "david", "linda", "paul", "steph")
SPEEDS = (130, 215)  # words per minute, inclusive range for user speech
PITCHES = (25, 75)  # espeak -p, inclusive range for user speech
GAINS = (0.35, 1.0)  # user speech level


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str
    pitch: int = 50
    speed: int = 165

    @property
    def name(self) -> str:
        return f"{self.accent}+{self.variant}"


# The four official TTS voice prompts -> four fixed espeak voices (accent + variant). Male and
# female variants have median F0 ~100 vs ~196 Hz (see `measure_tts_voices`). Chosen among the
# candidates for what the Whisper-base judge understands best, since TTS intelligibility is
# scored by it: on 30 held-out sentences en-us+m3 28%, en-us+f2 38%, en-gb+m1 30%, en-gb+f2 30%
# WER, where en-us+f3 (pitch 60), +f4, +Annie, +steph gave 49-67% and pitch 40/70 settings were
# worse as well.
TTS_VOICES = {
    "us-male": Voice("en-us", "m3"),
    "us-female": Voice("en-us", "f2"),
    "uk-male": Voice("en-gb", "m1"),
    "uk-female": Voice("en-gb", "f2"),
}
assert tuple(TTS_VOICES) == VOICES
# The voice of the spoken answers in speech-to-speech conversations. The judge finds the key
# value in espeak's audio of the answers 75% of the time in this voice, 62% in us-female.
ASSISTANT_VOICE = "us-male"


# ---- hashing and splits ------------------------------------------------------------------------


def _unit_hash(kind: str, text: str) -> float:
    """A stable number in [0, 1) for a string (independent of Python's hash seed)."""
    h = hashlib.sha1(f"{FORMAT}/{kind}/{text}".encode()).hexdigest()
    return int(h[:12], 16) / 16**12


def split_key(text: str) -> str:
    """What a sentence is split on: lower case, letters and digits only, so that punctuation or
    capitalisation variants of one sentence land on the same side."""
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split())


def sentence_split(text: str) -> str:
    return "test" if _unit_hash("sentence", split_key(text)) < HELD_OUT_SENTENCES else "train"


def question_split(text: str) -> str:
    return "test" if _unit_hash("question", split_key(text)) < HELD_OUT_QUESTIONS else "train"


def held_out_voices() -> set[tuple[str, str]]:
    """(accent, variant) pairs never used in training: in each accent, the variants with the
    lowest hash, skipping the four TTS voices (those must be learned)."""
    tts = {(v.accent, v.variant) for v in TTS_VOICES.values()}
    out = set()
    for accent in ACCENTS:
        ranked = sorted(VARIANTS, key=lambda v: _unit_hash("voice", f"{accent}+{v}"))
        out |= {(accent, v) for v in [v for v in ranked if (accent, v) not in tts][:HELD_OUT_VOICES_PER_ACCENT]}
    return out


def voice_pool(split: str) -> list[tuple[str, str]]:
    held = held_out_voices()
    return [(a, v) for a in ACCENTS for v in VARIANTS if ((a, v) in held) == (split == "test")]


# ---- numbers in words --------------------------------------------------------------------------

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                      "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}


def number_words(n: int) -> str:
    """12 -> "twelve", 24 -> "twenty-four", 105 -> "one hundred and five" (British 'and', which
    the evaluation normaliser drops)."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" and {number_words(rest)}" if rest else "")
    for scale, name in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            tail = "" if not rest else (" and " if rest < 100 else " ") + number_words(rest)
            return f"{number_words(head)} {name}{tail}"
    raise AssertionError(n)


def ordinal_words(n: int) -> str:
    """1 -> "first", 22 -> "twenty-second"."""
    head, last = re.match(r"^(.*?[ -])?([a-z]+)$", number_words(n)).groups()
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return (head or "") + last


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# ---- the question family -----------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    question: str  # what the user says
    answer: str  # the assistant's reply (text and speech)
    key: str  # the one right value, in words; it must appear in the reply
    family: str
    value: object = None  # what a follow-up builds on (a number, a day, a month)


DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")

_PLUS = ("What is {a} plus {b}?", "What's {a} plus {b}?", "How much is {a} plus {b}?",
         "What do you get when you add {a} and {b}?", "What is the sum of {a} and {b}?",
         "Can you tell me what {a} plus {b} is?", "Add {a} and {b}.", "What does {a} plus {b} make?")
_MINUS = ("What is {a} minus {b}?", "What's {a} minus {b}?", "How much is {a} minus {b}?",
          "What do you get if you take {b} away from {a}?", "Subtract {b} from {a}.",
          "What is {a} take away {b}?", "Can you tell me what {a} minus {b} is?")
_TIMES = ("What is {a} times {b}?", "What's {a} times {b}?", "What is {a} multiplied by {b}?",
          "How much is {a} times {b}?", "What is the product of {a} and {b}?", "Multiply {a} by {b}.")
_DIVIDED = ("What is {a} divided by {b}?", "What's {a} divided by {b}?", "How much is {a} divided by {b}?",
            "Divide {a} by {b}.")
_DOUBLE = ("What is double {a}?", "What is twice {a}?", "What do you get if you double {a}?")
_HALF = ("What is half of {a}?", "What's half of {a}?", "What do you get if you halve {a}?")
_BIGGER = ("Which is bigger, {a} or {b}?", "Which number is larger, {a} or {b}?",
           "Which is more, {a} or {b}?")
_SMALLER = ("Which is smaller, {a} or {b}?", "Which number is smaller, {a} or {b}?",
            "Which is less, {a} or {b}?")

_DAY_AFTER = ("What day comes after {d}?", "What day is after {d}?", "Which day follows {d}?",
              "What is the day after {d}?", "If today is {d}, what day is tomorrow?")
_DAY_BEFORE = ("What day comes before {d}?", "What is the day before {d}?",
               "If today is {d}, what day was yesterday?", "Which day comes just before {d}?")
_MONTH_AFTER = ("What month comes after {d}?", "Which month follows {d}?", "What is the month after {d}?",
                "What month is after {d}?")
_MONTH_BEFORE = ("What month comes before {d}?", "What is the month before {d}?",
                 "Which month comes just before {d}?")
_NUMBER_AFTER = ("What number comes after {a}?", "What is one more than {a}?", "What number follows {a}?")
_NUMBER_BEFORE = ("What number comes before {a}?", "What is one less than {a}?")

_OPPOSITE = ("What is the opposite of {w}?", "What's the opposite of {w}?", "Tell me the opposite of {w}.",
             "What word means the opposite of {w}?", "Which word is the opposite of {w}?",
             "Can you give me the opposite of {w}?")
# Both directions are asked when the reverse has one answer too; "one-way" pairs only forwards
# (the opposite of "short" could be "tall" or "long").
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
             ("wet", "dry"), ("hard", "soft"), ("early", "late"), ("full", "empty"), ("day", "night"),
             ("black", "white"), ("in", "out"), ("yes", "no"), ("push", "pull"), ("win", "lose"),
             ("rich", "poor"), ("thick", "thin"), ("strong", "weak"), ("clean", "dirty"), ("loud", "quiet"),
             ("high", "low"), ("true", "false"), ("inside", "outside"), ("above", "below"), ("before", "after"),
             ("first", "last"), ("awake", "asleep"), ("buy", "sell"), ("smooth", "rough"), ("wide", "narrow"),
             ("deep", "shallow"), ("question", "answer"), ("north", "south"), ("east", "west"),
             ("summer", "winter"), ("near", "far"), ("cheap", "expensive"), ("remember", "forget"),
             ("love", "hate"), ("alive", "dead"), ("top", "bottom"), ("front", "back"), ("always", "never"),
             ("everything", "nothing"), ("laugh", "cry"), ("boy", "girl"), ("man", "woman"), ("king", "queen"),
             ("brother", "sister"), ("minimum", "maximum"), ("odd", "even"), ("possible", "impossible"),
             ("polite", "rude"), ("safe", "dangerous"), ("open", "closed"), ("sweet", "sour"),
             ("entrance", "exit"), ("friend", "enemy")]
OPPOSITES_ONE_WAY = [("long", "short"), ("tall", "short"), ("young", "old"), ("new", "old"), ("heavy", "light"),
                     ("difficult", "easy"), ("wrong", "right"), ("left", "right"), ("start", "finish")]

_HAS = ("How many {thing} does {subj} have?", "How many {thing} has {subj} got?",
        "Can you tell me how many {thing} {subj} has?", "Do you know how many {thing} {subj} has?")
HAS_FACTS = [("legs", "a spider", 8), ("legs", "an insect", 6), ("legs", "a dog", 4), ("legs", "a cat", 4),
             ("legs", "a bird", 2), ("legs", "a horse", 4), ("legs", "a cow", 4), ("legs", "an ant", 6),
             ("legs", "a chicken", 2), ("legs", "a duck", 2), ("arms", "an octopus", 8), ("wheels", "a bicycle", 2),
             ("wheels", "a tricycle", 3), ("wheels", "a car", 4), ("wheels", "a unicycle", 1),
             ("sides", "a triangle", 3), ("sides", "a square", 4), ("sides", "a pentagon", 5),
             ("sides", "a hexagon", 6), ("sides", "an octagon", 8), ("sides", "a rectangle", 4),
             ("days", "a week", 7), ("months", "a year", 12), ("hours", "a day", 24), ("minutes", "an hour", 60),
             ("seconds", "a minute", 60), ("days", "a fortnight", 14), ("years", "a decade", 10),
             ("years", "a century", 100), ("fingers", "one hand", 5), ("toes", "one foot", 5),
             ("eyes", "a person", 2), ("wings", "a bird", 2), ("strings", "a violin", 4), ("cents", "a dollar", 100),
             ("pence", "a pound", 100), ("letters", "the English alphabet", 26), ("eggs", "a dozen", 12),
             ("faces", "a cube", 6), ("corners", "a square", 4), ("planets", "the solar system", 8),
             ("keys", "a piano", 88), ("players", "a chess game", 2), ("years", "a millennium", 1000)]

_COLOUR = ("What colour is {x}?", "What is the colour of {x}?", "Tell me the colour of {x}.",
           "Which colour is {x}?", "What colour do you think {x} is?")
COLOURS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"), ("coal", "black"),
           ("a lemon", "yellow"), ("a tomato", "red"), ("milk", "white"), ("a carrot", "orange"),
           ("a strawberry", "red"), ("chocolate", "brown"), ("a frog", "green"), ("a fire engine", "red"),
           ("a polar bear", "white"), ("a crow", "black"), ("an elephant", "grey"), ("a pumpkin", "orange"),
           ("a cucumber", "green"), ("blood", "red"), ("the sea", "blue"), ("a flamingo", "pink"),
           ("soot", "black"), ("a plum", "purple"), ("a raven", "black"), ("a swan", "white"), ("a lime", "green"),
           ("a cherry", "red"), ("a lettuce", "green"), ("a canary", "yellow"), ("a sunflower", "yellow")]

_CAPITAL = ("What is the capital of {c}?", "What's the capital city of {c}?", "Which city is the capital of {c}?",
            "Name the capital of {c}.", "Do you know the capital of {c}?")
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
            ("England", "London"), ("Ireland", "Dublin"), ("Scotland", "Edinburgh"), ("Wales", "Cardiff"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
            ("Hungary", "Budapest"), ("Canada", "Ottawa"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Belgium", "Brussels"),
            ("the Netherlands", "Amsterdam"), ("Cuba", "Havana"), ("Turkey", "Ankara"), ("Australia", "Canberra")]

_PLURAL = ("What is the plural of {w}?", "What's the plural of {w}?", "What do you call more than one {w}?",
           "How do you say more than one {w}?")
PLURALS = [("mouse", "mice"), ("goose", "geese"), ("child", "children"), ("man", "men"), ("woman", "women"),
           ("foot", "feet"), ("tooth", "teeth"), ("person", "people"), ("ox", "oxen"), ("sheep", "sheep"),
           ("leaf", "leaves"), ("knife", "knives"), ("wife", "wives"), ("wolf", "wolves"), ("half", "halves"),
           ("loaf", "loaves"), ("potato", "potatoes"), ("box", "boxes"), ("baby", "babies"), ("city", "cities"),
           ("bus", "buses"), ("cactus", "cacti"), ("fish", "fish"), ("deer", "deer")]

_BABY = ("What is a baby {a} called?", "What do you call a baby {a}?", "What is the name for a baby {a}?",
         "What is a young {a} called?")
BABIES = [("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
          ("goat", "kid"), ("frog", "tadpole"), ("duck", "duckling"), ("pig", "piglet"), ("bear", "cub"),
          ("lion", "cub"), ("kangaroo", "joey"), ("swan", "cygnet"), ("goose", "gosling"), ("owl", "owlet"),
          ("deer", "fawn"), ("hen", "chick"), ("fox", "cub"), ("tiger", "cub"), ("whale", "calf")]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@functools.lru_cache(maxsize=1)
def question_family() -> tuple[QA, ...]:
    """Every question of the family: 86 wordings x their values, 12,639 questions (and 15
    follow-up wordings, see `follow_up`), in a fixed order.

    Replies restate the question before the key ("The capital of Norway is Oslo."), although
    the key then often falls after the 6 text tokens that precede an interleaved reply's first
    audio: the restatement is what the model answers from. Trained on key-first replies ("Oslo
    is the capital of Norway."), the demo recipe's model guessed keys of the wrong family
    ("Havana is the capital." for an opposite) and answered 12 of 24 held-out questions, as
    many as with restated ones, at a higher validation loss (1.43 against 1.36)."""
    w, out = number_words, []

    def add(templates, fill: dict, answer: str, key: str, family: str, value=None):
        for t in templates:
            out.append(QA(t.format(**fill), answer, key, family, value))

    for a in range(21):
        for b in range(21):
            add(_PLUS, {"a": w(a), "b": w(b)}, f"{_cap(w(a))} plus {w(b)} is {w(a + b)}.", w(a + b), "plus", a + b)
            if b <= a:
                add(_MINUS, {"a": w(a), "b": w(b)}, f"{_cap(w(a))} minus {w(b)} is {w(a - b)}.", w(a - b), "minus",
                    a - b)
    for a in range(13):
        for b in range(13):
            add(_TIMES, {"a": w(a), "b": w(b)}, f"{_cap(w(a))} times {w(b)} is {w(a * b)}.", w(a * b), "times", a * b)
    for b in range(1, 11):
        for q in range(13):
            add(_DIVIDED, {"a": w(b * q), "b": w(b)}, f"{_cap(w(b * q))} divided by {w(b)} is {w(q)}.", w(q),
                "divided", q)
    for a in range(51):
        add(_DOUBLE, {"a": w(a)}, f"Double {w(a)} is {w(2 * a)}.", w(2 * a), "double", 2 * a)
    for a in range(0, 101, 2):
        add(_HALF, {"a": w(a)}, f"Half of {w(a)} is {w(a // 2)}.", w(a // 2), "half", a // 2)
    pairs = random.Random(f"{FORMAT}/compare").sample([(a, b) for a in range(101) for b in range(101) if a != b], 600)
    for a, b in pairs:
        big, small = w(max(a, b)), w(min(a, b))
        add(_BIGGER, {"a": w(a), "b": w(b)}, f"The bigger number is {big}.", big, "compare", max(a, b))
        add(_SMALLER, {"a": w(a), "b": w(b)}, f"The smaller number is {small}.", small, "compare", min(a, b))
    for i, d in enumerate(DAYS):
        nxt, prv = DAYS[(i + 1) % 7], DAYS[i - 1]
        add(_DAY_AFTER, {"d": d}, f"The day after {d} is {nxt}.", nxt, "day", nxt)
        add(_DAY_BEFORE, {"d": d}, f"The day before {d} is {prv}.", prv, "day", prv)
    for i, m in enumerate(MONTHS):
        nxt, prv = MONTHS[(i + 1) % 12], MONTHS[i - 1]
        add(_MONTH_AFTER, {"d": m}, f"The month after {m} is {nxt}.", nxt, "month", nxt)
        add(_MONTH_BEFORE, {"d": m}, f"The month before {m} is {prv}.", prv, "month", prv)
    for a in range(1, 100):
        add(_NUMBER_AFTER, {"a": w(a)}, f"The number after {w(a)} is {w(a + 1)}.", w(a + 1), "successor", a + 1)
        add(_NUMBER_BEFORE, {"a": w(a)}, f"The number before {w(a)} is {w(a - 1)}.", w(a - 1), "successor", a - 1)
    for x, y in OPPOSITES:
        add(_OPPOSITE, {"w": x}, f"The opposite of {x} is {y}.", y, "opposite")
        add(_OPPOSITE, {"w": y}, f"The opposite of {y} is {x}.", x, "opposite")
    for x, y in OPPOSITES_ONE_WAY:
        add(_OPPOSITE, {"w": x}, f"The opposite of {x} is {y}.", y, "opposite")
    for thing, subj, n in HAS_FACTS:
        add(_HAS, {"thing": thing, "subj": subj}, f"{_cap(subj)} has {w(n)} {thing}.", w(n), "count", n)
    for x, c in COLOURS:
        add(_COLOUR, {"x": x}, f"{_cap(x)} is {c}.", c, "colour")
    for country, city in CAPITALS:
        add(_CAPITAL, {"c": country}, f"The capital of {country} is {city}.", city, "capital")
    for x, p in PLURALS:
        add(_PLURAL, {"w": x}, f"The plural of {x} is {p}.", p, "plural")
    for x, b in BABIES:
        add(_BABY, {"a": x}, f"A baby {x} is called {_article(b)} {b}.", b, "baby")
    return tuple(out)


_FOLLOW_PLUS = ("And what is that plus {k}?", "Now add {k} to that.", "What if you add {k} more?",
                "And plus {k}?")
_FOLLOW_MINUS = ("And what is that minus {k}?", "Now take away {k}.", "What if you subtract {k}?",
                 "And minus {k}?")
_FOLLOW_TIMES = ("And what is that times {k}?", "Now multiply that by {k}.", "What is that times {k}?")
_FOLLOW_NEXT = ("And the one after that?", "And what comes after that?", "What comes next?",
                "And after that one?")
_NUMERIC = ("plus", "minus", "times", "divided", "double", "half", "successor")


def follow_up(prev: QA, rng: random.Random, split: str) -> QA | None:
    """A question that builds on the previous answer, or None when there is none. Its wording
    must belong to `split` (so test follow-ups are worded unlike any training turn)."""
    w = number_words
    options = []
    if prev.family in _NUMERIC and isinstance(prev.value, int):
        v = prev.value
        for k in range(1, 11):
            options += [(t.format(k=w(k)), f"{_cap(w(v))} plus {w(k)} is {w(v + k)}.", v + k) for t in _FOLLOW_PLUS]
            if k <= v:
                options += [(t.format(k=w(k)), f"{_cap(w(v))} minus {w(k)} is {w(v - k)}.", v - k)
                            for t in _FOLLOW_MINUS]
        for k in (2, 3):
            if v * k <= 200:
                options += [(t.format(k=w(k)), f"{_cap(w(v))} times {w(k)} is {w(v * k)}.", v * k)
                            for t in _FOLLOW_TIMES]
        options = [(q, a, w(r), r, "follow") for q, a, r in options]
    elif prev.family in ("day", "month"):
        seq = DAYS if prev.family == "day" else MONTHS
        nxt = seq[(seq.index(prev.value) + 1) % len(seq)]
        answer = f"The {prev.family} after {prev.value} is {nxt}."
        options = [(q, answer, nxt, nxt, prev.family) for q in _FOLLOW_NEXT]
    options = [o for o in options if question_split(o[0]) == split]
    if not options:
        return None
    q, a, key, value, family = rng.choice(options)
    return QA(q, a, key, family, value)


# ---- WordNet sentences -------------------------------------------------------------------------

_SENTENCE_OK = re.compile(r"^[A-Za-z][A-Za-z ,.'!?;:-]*$")


def wordnet_sentences(wordnet_dir: Path | str = WORDNET_DIR) -> list[str]:
    """WordNet's quoted gloss examples, cleaned: 4-20 words, letters and plain punctuation only
    (no digits, whose spoken form is ambiguous), capitalised and ending in a stop. Sorted."""
    wordnet_dir = Path(wordnet_dir)
    files = sorted(wordnet_dir.glob("data.*"))
    if not files:
        raise FileNotFoundError(f"no WordNet data files in {wordnet_dir} (apt-get install wordnet-base)")
    found = set()
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:  # licence header / no gloss
                    continue
                for example in re.findall(r'"([^"]+)"', line.split(" | ", 1)[1]):
                    s = " ".join(example.split()).strip(" ;,:")
                    if not _SENTENCE_OK.match(s) or "--" in s or ".." in s or not 4 <= len(s.split()) <= 20:
                        continue
                    if s[-1] not in ".!?":
                        s += "."
                    found.add(_cap(s))
    # One spelling per split key (capitalisation or punctuation variants of one sentence).
    by_key = {}
    for s in sorted(found):
        by_key.setdefault(split_key(s), s)
    return sorted(by_key.values())


# ---- speech ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """One clip to render: everything that determines its samples, so it names its own file."""

    text: str
    accent: str
    variant: str
    speed: int
    pitch: int
    rate: int
    gain: float = 1.0

    @property
    def key(self) -> str:
        return hashlib.sha1(json.dumps([FORMAT_VERSION, *asdict(self).values()]).encode()).hexdigest()

    @property
    def path(self) -> str:
        k = self.key
        return f"audio/{self.rate // 1000}k/{k[:2]}/{k}.flac"

    @classmethod
    def of(cls, text: str, voice: Voice, rate: int, gain: float = 1.0) -> "Utterance":
        return cls(text, voice.accent, voice.variant, voice.speed, voice.pitch, rate, gain)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak(text: str, voice: str, speed: int = 165, pitch: int = 50) -> np.ndarray:
    """Speech from espeak-ng as float32 at 22,050 Hz. The text goes in on stdin, so nothing in it
    is taken for an option."""
    proc = subprocess.run(["espeak-ng", "--stdin", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch)],
                          input=text.encode(), capture_output=True, check=True)
    return _parse_wav(proc.stdout)


def _parse_wav(data: bytes) -> np.ndarray:
    # espeak-ng writes a streaming header whose sizes are placeholders (0x7ffff...), which some
    # readers reject; find the chunks ourselves and read the 16-bit mono samples to the end.
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not return a WAV stream")
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if cid == b"fmt ":
            channels, rate, bits = (int.from_bytes(data[pos + 10:pos + 12], "little"),
                                    int.from_bytes(data[pos + 12:pos + 16], "little"),
                                    int.from_bytes(data[pos + 22:pos + 24], "little"))
            if (channels, rate, bits) != (1, ESPEAK_RATE, 16):
                raise RuntimeError(f"unexpected espeak-ng format: {channels} ch, {rate} Hz, {bits} bit")
        if cid == b"data":
            body = data[pos + 8:]
            body = body[: len(body) // 2 * 2]
            return np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0
        pos += 8 + size
    raise RuntimeError("espeak-ng WAV stream has no data chunk")


def trim_silence(x: np.ndarray, rate: int, threshold: float = 2e-3, margin_s: float = 0.08) -> np.ndarray:
    """Drop leading and trailing silence beyond a short margin (espeak adds ~0.3 s at the end,
    which would be dead frames to train on)."""
    loud = np.flatnonzero(np.abs(x) > threshold)
    if loud.size == 0:
        return x
    m = int(margin_s * rate)
    return x[max(0, loud[0] - m): loud[-1] + 1 + m]


def render(utt: Utterance) -> np.ndarray:
    """An utterance's samples at its rate, float32 in [-1, 1]."""
    import soxr

    voice = f"{ESPEAK_FILES.get(utt.accent, utt.accent)}+{utt.variant}"
    x = trim_silence(espeak(utt.text, voice, utt.speed, utt.pitch), ESPEAK_RATE)
    y = soxr.resample(x, ESPEAK_RATE, utt.rate, quality="HQ").astype(np.float32)
    return np.clip(y * utt.gain, -1.0, 1.0)


def _render_to_file(job: tuple[Utterance, str]) -> tuple[str, int]:
    """Worker: render one utterance to its FLAC file unless it is there already; (key, samples)."""
    import soundfile as sf

    utt, root = job
    path = Path(root) / utt.path
    if path.exists():
        return utt.key, sf.info(str(path)).frames
    path.parent.mkdir(parents=True, exist_ok=True)
    y = render(utt)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(str(tmp), y, utt.rate, subtype="PCM_16", format="FLAC")
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written clip
    return utt.key, len(y)


def render_all(utterances, root: Path, workers: int = 2, progress: bool = False) -> dict[str, int]:
    """Render every distinct utterance (in parallel espeak-ng processes); {key: samples}."""
    unique = {u.key: u for u in utterances}
    jobs = [(u, str(root)) for u in unique.values()]
    done, lengths, t0 = 0, {}, time.time()
    if workers <= 1:
        results = map(_render_to_file, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_render_to_file, jobs, chunksize=32)
    try:
        for key, n in results:
            lengths[key] = n
            done += 1
            if progress and (done % 2000 == 0 or done == len(jobs)):
                print(f"  rendered {done}/{len(jobs)} clips ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    return lengths


# ---- pitch -------------------------------------------------------------------------------------


def pitch_track(x: np.ndarray, rate: int, fmin: float = 60.0, fmax: float = 400.0,
                frame_s: float = 0.04, hop_s: float = 0.01, voicing: float = 0.5) -> np.ndarray:
    """F0 (Hz) of the voiced frames, by normalised autocorrelation. A frame is voiced when it is
    within 25 dB of the loudest frame and its best autocorrelation peak in [1/fmax, 1/fmin]
    exceeds `voicing`. Taking the first lag that reaches 90% of the best peak avoids the usual
    octave-down errors (a peak at twice the period is almost as high as the true one)."""
    x = np.asarray(x, dtype=np.float64)
    n, hop = int(frame_s * rate), int(hop_s * rate)
    if len(x) < n:
        return np.zeros(0)
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[::hop]
    frames = frames - frames.mean(axis=1, keepdims=True)
    energy = (frames**2).sum(axis=1)
    keep = energy > energy.max() * 10 ** (-25 / 10)
    frames = frames[keep] * np.hanning(n)
    if not len(frames):
        return np.zeros(0)
    spec = np.fft.rfft(frames, 2 * n, axis=1)
    ac = np.fft.irfft(np.abs(spec) ** 2, axis=1)[:, :n]
    # Divide out the window's own autocorrelation so peaks at long lags are not penalised.
    w = np.fft.irfft(np.abs(np.fft.rfft(np.hanning(n), 2 * n)) ** 2)[:n]
    ac = ac / np.maximum(w / w[0], 1e-3)
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    lo, hi = int(rate / fmax), min(int(rate / fmin), n - 2)
    seg = ac[:, lo:hi + 1]
    best = seg.max(axis=1)
    f0 = []
    for row, peak in zip(seg, best):
        if peak < voicing:
            continue
        i = int(np.argmax(row >= 0.9 * peak))
        # walk up to the local maximum, then refine it with a parabola through three points
        while i + 1 < len(row) and row[i + 1] > row[i]:
            i += 1
        lag = float(lo + i)
        if 0 < i < len(row) - 1:
            a, b, c = row[i - 1], row[i], row[i + 1]
            denom = a - 2 * b + c
            if denom < 0:
                lag += 0.5 * (a - c) / denom
        f0.append(rate / lag)
    return np.array(f0)


def median_pitch(x: np.ndarray, rate: int) -> float:
    """Median F0 in Hz of the voiced frames (nan when none is voiced)."""
    f0 = pitch_track(x, rate)
    return float(np.median(f0)) if f0.size else float("nan")


def measure_tts_voices(sentences: list[str]) -> dict[str, float]:
    """Median F0 of each TTS voice over the given sentences (all voiced frames pooled)."""
    out = {}
    for name, voice in TTS_VOICES.items():
        f0 = np.concatenate([pitch_track(render(Utterance.of(s, voice, INPUT_RATE)), INPUT_RATE) for s in sentences])
        out[name] = float(np.median(f0)) if f0.size else float("nan")
    return out


# ---- conversations -----------------------------------------------------------------------------


@dataclass
class Pools:
    """What a split may draw from."""

    sentences: list[str]
    questions: list[QA]
    voices: list[tuple[str, str]]

    def __post_init__(self):
        self.by_family: dict[str, list[QA]] = {}
        for q in self.questions:
            self.by_family.setdefault(q.family, []).append(q)
        self.families = sorted(self.by_family)

    def question(self, rng: random.Random) -> QA:
        """A question of a family drawn uniformly: sums alone are thousands of wordings, the
        days of the week a few dozen, and each family should be learned."""
        return rng.choice(self.by_family[rng.choice(self.families)])


def pools(split: str, sentences: list[str] | None = None) -> Pools:
    if sentences is None:
        sentences = wordnet_sentences()
    return Pools(
        sentences=[s for s in sentences if sentence_split(s) == split],
        questions=[q for q in question_family() if question_split(q.question) == split],
        voices=voice_pool(split),
    )


def random_voice(rng: random.Random, pool: list[tuple[str, str]]) -> Voice:
    accent, variant = rng.choice(pool)
    return Voice(accent, variant, pitch=rng.randint(*PITCHES), speed=rng.randint(*SPEEDS))


@dataclass
class Planned:
    """A conversation before rendering: messages whose audio segments hold Utterances."""

    id: str
    split: str
    task: str
    messages: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def utterances(self):
        for m in self.messages:
            for seg in m["content"] if isinstance(m["content"], list) else ():
                if "utt" in seg:
                    yield seg["utt"]

    def to_json(self, lengths: dict[str, int] | None = None) -> dict:
        def seg_json(seg):
            if "utt" not in seg:
                return seg
            out = {k: v for k, v in seg.items() if k != "utt"}
            out["path"] = seg["utt"].path
            if lengths is not None and seg["utt"].key in lengths:
                out["seconds"] = round(lengths[seg["utt"].key] / seg["utt"].rate, 3)
            return out

        messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                     else [seg_json(s) for s in m["content"]]} for m in self.messages]
        return {"id": self.id, "split": self.split, "task": self.task, "messages": messages, "meta": self.meta}


def _voice_meta(v: Voice, gain: float | None = None) -> dict:
    d = {"accent": v.accent, "variant": v.variant, "speed": v.speed, "pitch": v.pitch}
    if gain is not None:
        d["gain"] = gain
    return d


def plan_asr(rng: random.Random, p: Pools, split: str, i: int, question_share: float) -> Planned:
    voice = random_voice(rng, p.voices)
    gain = round(rng.uniform(*GAINS), 2)
    if split == "train" and rng.random() < question_share:
        text, source = p.question(rng).question, "question"
    else:
        # Test ASR is on held-out WordNet sentences only: general speech, not the question family.
        text, source = rng.choice(p.sentences), "wordnet"
    utt = Utterance.of(text, voice, INPUT_RATE, gain)
    return Planned(f"{split}-asr-{i:06d}", split, "asr", [
        {"role": "system", "content": SYSTEM_PROMPTS["asr"]},
        {"role": "user", "content": [{"type": "audio", "utt": utt}]},
        {"role": "assistant", "content": [{"type": "text", "text": text}]},
    ], {"text": text, "source": source, "voice": _voice_meta(voice, gain)})


def plan_tts(rng: random.Random, p: Pools, split: str, i: int, answer_share: float) -> Planned:
    # Cycle through the voices so each gets a quarter of the set (and of any prefix of it).
    name = VOICES[i % len(VOICES)]
    if split == "train" and rng.random() < answer_share:
        text, source = p.question(rng).answer, "answer"
    else:
        text, source = rng.choice(p.sentences), "wordnet"
    utt = Utterance.of(text, TTS_VOICES[name], OUTPUT_RATE)
    return Planned(f"{split}-tts-{i:06d}", split, "tts", [
        {"role": "system", "content": SYSTEM_PROMPTS[f"tts-{name}"]},
        {"role": "user", "content": text},
        {"role": "assistant", "content": [{"type": "audio", "utt": utt}]},
    ], {"text": text, "source": source, "voice_name": name, "voice": _voice_meta(TTS_VOICES[name])})


def plan_s2s(rng: random.Random, p: Pools, split: str, i: int, assistant_voice: str) -> Planned:
    """One to three spoken questions from one speaker, each answered in interleaved text and
    speech; later turns are follow-ups on the previous answer half of the time."""
    voice = random_voice(rng, p.voices)
    gain = round(rng.uniform(*GAINS), 2)
    n_turns = rng.choices((1, 2, 3), weights=(0.4, 0.35, 0.25))[0]
    messages = [{"role": "system", "content": SYSTEM_PROMPTS["chat"]}]
    turns, prev = [], None
    for _ in range(n_turns):
        qa = follow_up(prev, rng, split) if prev is not None and rng.random() < 0.5 else None
        qa = qa or p.question(rng)
        question = Utterance.of(qa.question, voice, INPUT_RATE, gain)
        messages.append({"role": "user", "content": [{"type": "audio", "utt": question, "transcript": qa.question}]})
        messages.append({"role": "assistant", "content": [
            {"type": "interleaved", "text": qa.answer,
             "utt": Utterance.of(qa.answer, TTS_VOICES[assistant_voice], OUTPUT_RATE)}]})
        turns.append({"question": qa.question, "answer": qa.answer, "key": qa.key, "family": qa.family})
        prev = qa
    return Planned(f"{split}-s2s-{i:06d}", split, "s2s", messages,
                   {"turns": turns, "voice": _voice_meta(voice, gain), "assistant_voice": assistant_voice})


def plan(split: str, task: str, n: int, seed: int, p: Pools, assistant_voice: str = ASSISTANT_VOICE,
         question_share: float = 0.25) -> list[Planned]:
    """n conversations of one task and split. Each (split, task) has its own random stream, so
    the sets do not depend on one another's sizes, and a longer set starts with a shorter one."""
    rng = random.Random(f"{FORMAT}/{seed}/{split}/{task}")
    if task == "asr":
        return [plan_asr(rng, p, split, i, question_share) for i in range(n)]
    if task == "tts":
        return [plan_tts(rng, p, split, i, question_share) for i in range(n)]
    if task == "s2s":
        return [plan_s2s(rng, p, split, i, assistant_voice) for i in range(n)]
    raise ValueError(f"unknown task {task!r}")


# ---- the whole data set ------------------------------------------------------------------------


def generate_dataset(out_dir, seed: int = 0, n_asr: int = 0, n_tts: int = 0, n_s2s: int = 0, n_test: int = 200,
                     workers: int = 2, shard_size: int = 2000, assistant_voice: str = ASSISTANT_VOICE,
                     question_share: float = 0.25, sentences: list[str] | None = None,
                     progress: bool = True) -> dict:
    """Plan, render and write a data set (see the module docstring); returns the manifest.
    Clips already on disk are reused, so an interrupted run can simply be started again."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    if assistant_voice not in TTS_VOICES:
        raise ValueError(f"assistant_voice must be one of {', '.join(TTS_VOICES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if sentences is None:
        sentences = wordnet_sentences()
    train_pools, test_pools = pools("train", sentences), pools("test", sentences)
    kw = {"assistant_voice": assistant_voice, "question_share": question_share}
    train = [c for task, n in (("asr", n_asr), ("tts", n_tts), ("s2s", n_s2s))
             for c in plan("train", task, n, seed, train_pools, **kw)]
    random.Random(f"{FORMAT}/{seed}/shuffle").shuffle(train)
    tests = {task: plan("test", task, n_test, seed, test_pools, **kw) for task in ("asr", "tts", "s2s")}
    everything = train + [c for cs in tests.values() for c in cs]
    planned_s = time.time() - t0
    if progress:
        print(f"planned {len(train)} training and {sum(map(len, tests.values()))} test conversations "
              f"in {planned_s:.1f} s; rendering with {workers} espeak-ng workers", file=sys.stderr, flush=True)

    t1, cpu1 = time.time(), _cpu_seconds()
    utts = [u for c in everything for u in c.utterances()]
    lengths = render_all(utts, out, workers, progress)
    render_s, render_cpu = time.time() - t1, _cpu_seconds() - cpu1
    unique = {u.key: u for u in utts}
    speech_s = sum(lengths[k] / u.rate for k, u in unique.items())

    shards = []

    def write(name: str, convs: list[Planned], split: str, task: str):
        with (out / name).open("w") as f:
            for c in convs:
                f.write(json.dumps(c.to_json(lengths)) + "\n")
        secs = {"in": 0.0, "out": 0.0}
        for c in convs:
            for u in c.utterances():
                secs["in" if u.rate == INPUT_RATE else "out"] += lengths[u.key] / u.rate
        shards.append({"path": name, "split": split, "task": task, "conversations": len(convs),
                       "hours_in": round(secs["in"] / 3600, 3), "hours_out": round(secs["out"] / 3600, 3)})

    for s in range(0, len(train), shard_size):
        write(f"train-{s // shard_size:05d}.jsonl", train[s:s + shard_size], "train", "mixed")
    for task, convs in tests.items():
        write(f"test-{task}.jsonl", convs, "test", task)

    wall = time.time() - t0
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "seed": seed,
        "sizes": {"train": {"asr": n_asr, "tts": n_tts, "s2s": n_s2s}, "test_per_task": n_test},
        "options": {"assistant_voice": assistant_voice, "question_share": question_share, "workers": workers,
                    "shard_size": shard_size},
        "rates": {"input": INPUT_RATE, "output": OUTPUT_RATE},
        "tts_voices": {k: asdict(v) for k, v in TTS_VOICES.items()},
        "splits": {"held_out_sentence_fraction": HELD_OUT_SENTENCES, "held_out_question_fraction": HELD_OUT_QUESTIONS,
                   "held_out_voices": sorted("+".join(v) for v in held_out_voices()),
                   "train_sentences": len(train_pools.sentences), "test_sentences": len(test_pools.sentences),
                   "train_questions": len(train_pools.questions), "test_questions": len(test_pools.questions)},
        "shards": shards,
        "clips": len(unique),
        "hours_of_speech": round(speech_s / 3600, 3),
        "seconds": {"plan": round(planned_s, 1), "render": round(render_s, 1), "render_cpu": round(render_cpu, 1),
                    "total": round(wall, 1)},
        # Speech rendered per minute of rendering (clips reused from an earlier run count too),
        # and per CPU-minute (this process and its workers and espeak-ng children), which does
        # not depend on what else the machine is doing.
        "hours_per_minute": round(speech_s / 3600 / max(render_s / 60, 1e-9), 3),
        "hours_per_cpu_minute": round(speech_s / 3600 / max(render_cpu / 60, 1e-9), 3),
        "sources": {"sentences": "WordNet 3.0 gloss examples (Debian wordnet-base); see training/WORDNET_LICENSE",
                    "speech": "espeak-ng " + _espeak_version()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers include the
    espeak-ng processes they waited for)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _espeak_version() -> str:
    try:
        return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.split()[3]
    except (OSError, IndexError):
        return "?"


def read_records(path) -> list[dict]:
    """The records of one JSONL file written by generate_dataset (paths stay relative)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """Generate synthetic training and held-out test conversations with espeak-ng."""
    ap = argparse.ArgumentParser(prog="python -m lfm2_audio.training.synth", description=main.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--asr", type=int, default=10000, help="training ASR conversations")
    ap.add_argument("--tts", type=int, default=10000, help="training TTS conversations (a quarter per voice)")
    ap.add_argument("--s2s", type=int, default=10000, help="training speech-to-speech conversations (1-3 turns)")
    ap.add_argument("--test", type=int, default=200, help="test conversations per task")
    ap.add_argument("--workers", type=int, default=2, help="espeak-ng processes")
    ap.add_argument("--shard-size", type=int, default=2000, help="conversations per training JSONL file")
    ap.add_argument("--assistant-voice", default=ASSISTANT_VOICE, choices=VOICES, help="the voice of spoken answers")
    ap.add_argument("--question-share", type=float, default=0.25,
                    help="share of training ASR (TTS) clips that are questions (answers) of the task family")
    ap.add_argument("--wordnet-dir", default=str(WORDNET_DIR))
    ap.add_argument("--pitch", action="store_true", help="also measure and print the TTS voices' median pitch")
    args = ap.parse_args(argv)
    try:
        sentences = wordnet_sentences(args.wordnet_dir)
        m = generate_dataset(args.out_dir, args.seed, args.asr, args.tts, args.s2s, args.test, args.workers,
                             args.shard_size, args.assistant_voice, args.question_share, sentences)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out_dir}: {m['clips']} clips, {m['hours_of_speech']} h of speech; rendered at "
          f"{m['hours_per_minute']} h of speech per minute of wall time, {m['hours_per_cpu_minute']} h per "
          f"CPU-minute ({m['seconds']['total']} s in all)")
    if args.pitch:
        test = [s for s in sentences if sentence_split(s) == "test"][:10]
        for name, f0 in measure_tts_voices(test).items():
            print(f"  {name:10s} {TTS_VOICES[name].name:10s} median F0 {f0:6.1f} Hz")
    return 0


if __name__ == "__main__":
    sys.exit(main())

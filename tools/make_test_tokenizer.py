"""Build a small byte-level BPE tokenizer.json laid out like the LFM2 one (spec §4).

The special tokens sit at the official ids (0 pad, 1 BOS, 2 EOS, 6/7 im_start/end,
128..133 audio/text/mixed markers) and every learned token comes after them, so a model
trained with this vocabulary uses the same special ids as the released checkpoints.

    python tools/make_test_tokenizer.py                       # tests/assets/tokenizer.json
    python tools/make_test_tokenizer.py --vocab-size 8192 --corpus text.txt --out demo/tokenizer.json
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# GPT-4 style pre-split: words with their leading space, 1-3 digit groups, punctuation runs.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NAMED = {
    0: "<|pad|>",
    1: "<|startoftext|>",
    2: "<|endoftext|>",
    6: "<|im_start|>",
    7: "<|im_end|>",
    128: "<|audio_start|>",
    129: "<|text_start|>",
    130: "<|text_end|>",
    131: "<|mixed_start|>",
    132: "<|mixed_end|>",
    133: "<|reserved_123|>",
}
N_SPECIAL = 134

WORDS = """
about above across after again against almost along already also always among animal answer
any anything around ask away back because become before begin behind believe best better
between big black blue body book both bring brother build business call car care carry case
change child children city class clear close cold color come company complete country course
cut dark day deep different do door down draw during each early earth easy eat end enough
even evening every example eye face fact family far father feel few field find fire first fish
five follow food foot form four free friend from full game garden girl give glass go good great
green ground group grow hand happy hard head hear heart heavy help here high home horse hour
house idea important inside island just keep kind king know land language large last late laugh
learn leave left letter life light line listen little live long look love low machine make man
many map mark matter mean measure minute money month moon morning mother mountain move much
music must name near need never new next night nothing notice number ocean often old only open
order other paper part pass people perhaps picture piece place plan plant play point power
probably problem question quick quiet rain reach read ready real remember rest right river road
rock room round rule run same school science sea second see sentence several shape short should
show side simple since sing sit six size sleep slow small snow something sometimes song soon
sound south space speak special spring stand star start stay still stone stop story street
strong study such summer sun sure surface table take talk teach tell ten than thing think three
through time together too top toward town travel tree true try turn under understand until
usually very voice wait walk warm watch water wave week weight well west what wheel where
while white whole why wide wind window winter without woman wonder wood word work world write
year yellow young
""".split()


def special_tokens() -> list[str]:
    """Tokens for ids 0..133. Unnamed ids >= 10 follow the `<|reserved_k|>` = id k + 10 rule;
    the few below 10 (3-5, 8, 9) get filler names that cannot clash with it."""
    out = []
    for i in range(N_SPECIAL):
        if i in NAMED:
            out.append(NAMED[i])
        elif i >= 10:
            out.append(f"<|reserved_{i - 10}|>")
        else:
            out.append(f"<|filler_{i}|>")
    return out


def builtin_corpus(n_lines: int = 600, seed: int = 0) -> list[str]:
    """A few hundred deterministic English lines: prompts, chat roles and plain sentences."""
    rng = random.Random(seed)
    subjects = ["the cat", "my friend", "a small robot", "the weather", "our team", "this model",
                "the old man", "she", "he", "they", "we", "you", "the teacher", "a dog", "the city"]
    verbs = ["is walking to", "likes", "was talking about", "will visit", "can hear", "found",
             "is thinking about", "wants to see", "remembers", "has never seen", "reads", "sings to"]
    objects = ["the park", "a blue house", "the river", "music", "the station", "an apple",
               "the window", "a long story", "the morning news", "three birds", "the mountains",
               "her brother", "the kitchen", "a new song", "the library", "twenty people"]
    tails = [".", "!", "?", " today.", " again.", " in the evening.", ", I think.", " every day.",
             " right now.", " last year.", ", doesn't it?", " with a smile."]
    fixed = [
        "Perform ASR.", "Perform TTS.", "Respond with interleaved text and audio.",
        "Use the US male voice.", "Use the US female voice.", "Use the UK male voice.",
        "Use the UK female voice.", "system", "user", "assistant", "Hello, how are you?",
        "What time is it? It's 10:30 in the morning.", "The numbers are 1, 2, 3 and 2024.",
        "Thank you very much.", "I'm not sure, but I'll try.", "Yes.", "No.", "Okay!",
    ]
    lines = list(fixed)
    while len(lines) < n_lines:
        if rng.random() < 0.5:
            s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(tails)}"
        else:  # looser word salad, so the merges reach a wider vocabulary
            s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + rng.choice(tails)
        lines.append(s[0].upper() + s[1:])
    return lines


def build(lines: list[str], vocab_size: int) -> Tokenizer:
    specials = special_tokens()
    n_min = N_SPECIAL + 256
    if vocab_size <= n_min:
        raise SystemExit(f"--vocab-size must exceed {n_min} (134 specials + 256 byte symbols)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,  # the trainer assigns these ids 0..133 in order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    # Like the official file: a BOS template exists, but the runtime encodes without it.
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", pair="<|startoftext|> $A $B", special_tokens=[("<|startoftext|>", 1)]
    )
    for i, t in enumerate(specials):
        if tok.token_to_id(t) != i:
            raise SystemExit(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-size", type=int, default=1000, help="total ids incl. specials and bytes")
    ap.add_argument("--corpus", type=Path, help="UTF-8 text file, one line per sample (default: built-in)")
    default_out = Path(__file__).resolve().parents[1] / "tests/assets/tokenizer.json"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args(argv)
    lines = args.corpus.read_text(encoding="utf-8").splitlines() if args.corpus else builtin_corpus()
    tok = build([ln for ln in lines if ln.strip()], args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out), pretty=False)
    print(f"wrote {args.out}: {tok.get_vocab_size()} ids, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()

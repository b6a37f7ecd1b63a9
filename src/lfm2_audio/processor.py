"""Text side: the checkpoint's byte-level BPE tokenizer and its special-token ids.

Special ids are looked up by name in the tokenizer file rather than hard-coded, so a
checkpoint with a different vocabulary layout still works.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers

from .errors import InputError

# attribute prefix -> token text; every one must exist in the tokenizer.
SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "audio_start": "<|audio_start|>",
    "text_start": "<|text_start|>",
    "text_end": "<|text_end|>",
}


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; exposes `pad_id`, `bos_id`, ..., `text_end_id`."""

    def __init__(self, tok: tokenizers.Tokenizer, source: str = "<tokenizer>"):
        self.tok = tok
        self.source = source
        missing = []
        for key, text in SPECIAL_TOKENS.items():
            idx = tok.token_to_id(text)
            if idx is None:
                missing.append(text)
            setattr(self, f"{key}_id", idx)
        if missing:
            raise InputError(f"tokenizer {source} lacks required special token(s): {', '.join(missing)}")
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"tokenizer file not found: {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises bare Exception on malformed JSON
            raise InputError(f"cannot load tokenizer {path}: {e}") from None
        return cls(tok, str(path))

    @classmethod
    def from_pretrained(cls, dir_or_file) -> "Tokenizer":
        """Load `tokenizer.json` from a checkpoint directory, or a tokenizer file itself."""
        p = Path(dir_or_file)
        return cls.from_file(p / "tokenizer.json" if p.is_dir() else p)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS added; special tokens in the text become their single ids.

        The reference tokenises each prompt piece separately; call this per piece to match it.
        """
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise InputError(f"token id(s) {bad[:5]} out of range for a vocabulary of {n}")
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.tok.id_to_token(int(idx))

    def is_special(self, idx: int) -> bool:
        return int(idx) in self.special_ids

    def stream(self, skip_special_tokens: bool = False) -> "TextStream":
        """An incremental decoder for printing text as tokens are generated."""
        return TextStream(self, skip_special_tokens)


class TextStream:
    """Turns ids arriving one at a time into text pieces.

    Byte-level BPE can split a character across tokens; text is held back until the bytes
    form whole characters, so the pieces join to `decode(all_ids)`. Only the ids since the
    last emitted piece are re-decoded, so cost stays flat over long generations.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were emitted; decoded again as left context
        self.read = 0

    def put(self, idx: int) -> str:
        self.ids.append(int(idx))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. a dangling partial character)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix :], self.skip)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""  # nothing new, or an incomplete UTF-8 sequence so far
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]

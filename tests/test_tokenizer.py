import json
from pathlib import Path

import pytest
import tokenizers

from lfm2_audio.errors import InputError
from lfm2_audio.processor import Tokenizer

ASSET = Path(__file__).parent / "assets" / "tokenizer.json"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(ASSET.parent)


def test_special_ids_read_from_file(tok):
    ids = {k: getattr(tok, f"{k}_id") for k in
           ("pad", "bos", "eos", "im_start", "im_end", "audio_start", "text_start", "text_end")}
    assert ids == dict(pad=0, bos=1, eos=2, im_start=6, im_end=7, audio_start=128, text_start=129, text_end=130)
    assert tok.token_to_id("<|reserved_123|>") == 133
    assert tok.vocab_size <= 1024
    assert tok.is_special(7) and not tok.is_special(200)


def test_from_file_and_dir_agree(tok):
    other = Tokenizer.from_file(ASSET)
    assert other.encode("Perform ASR.") == tok.encode("Perform ASR.")


def test_no_bos_added_and_piecewise(tok):
    # The file has a BOS template; encode must not apply it.
    assert tok.encode("<|startoftext|>") == [1]
    assert tok.encode("hello")[0] != tok.bos_id
    turn = tok.encode("<|im_start|>user\n")
    assert turn[0] == tok.im_start_id and turn[1:] == tok.encode("user\n")
    assert tok.encode("<|im_end|>\n") == [tok.im_end_id] + tok.encode("\n")


def test_specials_inside_text_are_atoms(tok):
    ids = tok.encode("Yes.<|text_end|>")
    assert ids[-1] == tok.text_end_id and ids[:-1] == tok.encode("Yes.")
    ids = tok.encode("a<|im_end|>b<|audio_start|>")
    assert ids.count(tok.im_end_id) == 1 and ids[-1] == tok.audio_start_id
    assert all(i >= 134 for i in tok.encode("plain text, no specials at all!"))


def test_decode_roundtrip(tok):
    text = "Hello, wörld! 10:30 🙂 <|im_end|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "Hello, wörld! 10:30 🙂 "
    with pytest.raises(InputError, match="out of range"):
        tok.decode([5000])


def test_stream_matches_decode(tok):
    text = "héllo 🙂 wörld<|im_end|>"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="cannot load"):
        Tokenizer.from_pretrained(tmp_path)


def test_missing_special_token(tmp_path):
    vocab = {t: i for i, t in enumerate(["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>",
                                         "<|im_end|>", "<|audio_start|>", "<|text_start|>", "a"])}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    t.add_special_tokens([k for k in vocab if k.startswith("<|")])
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(InputError, match=r"<\|text_end\|>"):
        Tokenizer.from_pretrained(tmp_path)
    json.loads((tmp_path / "tokenizer.json").read_text())  # the file itself was valid

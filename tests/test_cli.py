"""The command line end to end on a tiny random checkpoint."""

import numpy as np
import pytest
import soundfile as sf

from lfm2_audio.cli import main


def test_init_random_asr_tts_chat(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tok = __import__("conftest").ASSETS / "tokenizer.json"
    assert main(["init-random", str(ckpt), "--tokenizer", str(tok)]) == 0
    wav = tmp_path / "q.wav"
    t = np.arange(24000) / 24000
    sf.write(wav, np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 300 * t)], 1) * 0.2, 24000)
    common = ["--model", str(ckpt), "--max-new-tokens", "8", "--threads", "1"]
    assert main(["asr", str(wav), *common]) == 0
    assert main(["tts", "hello there", "-o", str(tmp_path / "s.wav"), "--seed", "1", *common]) == 0
    assert main(["chat", str(wav), "what else?", "--out-dir", str(tmp_path), *common]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant:") == 2 and "[audio: 2 frames" in out  # 6 text steps, then 2 frames
    assert main(["asr", str(tmp_path / "missing.wav"), *common]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["asr", str(wav), "--model", str(tmp_path / "nope" / "x" / "y")]) == 2


def test_tts_and_chat_write_wav_through_the_codec(tmp_path, capsys):
    from lfm2_audio.serving.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", __import__("conftest").ASSETS / "tokenizer.json")
    common = ["--model", str(ckpt), "--threads", "1", "--seed", "0"]
    assert main(["tts", "hello there", "-o", str(tmp_path / "s.wav"), "--max-new-tokens", "7", *common]) == 0
    wave, rate = sf.read(tmp_path / "s.wav")
    assert rate == 24000 and len(wave) == 6 * 1920  # <|audio_start|>, then 6 frames of 80 ms
    assert main(["chat", "hi", "--out-dir", str(tmp_path), "--max-new-tokens", "10", *common]) == 0
    wave, rate = sf.read(tmp_path / "reply_1.wav")
    assert rate == 24000 and len(wave) == 4 * 1920  # 6 text steps, then 4 frames
    assert "[audio: " in capsys.readouterr().out


def test_fast_and_plain_engines_print_the_same_greedy_reply(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["init-random", str(ckpt), "--tokenizer", str(__import__("conftest").ASSETS / "tokenizer.json")]) == 0
    common = ["--model", str(ckpt), "--max-new-tokens", "12", "--threads", "1", "--temperature", "0"]
    outs = []
    for engine in ("plain", "fast"):
        capsys.readouterr()
        assert main(["chat", "hello there", "--engine", engine, "--out-dir", str(tmp_path / engine), *common]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "assistant:" in outs[0]
    with pytest.raises(SystemExit):  # argparse refuses unknown modes
        main(["asr", "x.wav", "--quantize", "int4", *common])

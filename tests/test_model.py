"""The model against transformers' LFM2 and the official implementation's outputs; loading."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SHARED_FIXTURE, tiny_config
from lfm2_audio.config import Lfm2Config, LFM2AudioConfig, official_config
from lfm2_audio.errors import InputError
from lfm2_audio.model.lfm2 import Lfm2Model
from lfm2_audio.model.lfm2_audio import LFM2AudioModel

REPO = Path(__file__).resolve().parents[1]


def _hf_pair(layer_types, seed=0):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=300, hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=192, block_multiple_of=32, layer_types=layer_types,
              norm_eps=1e-5, block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=True)
    torch.manual_seed(seed)
    hf = transformers.Lfm2Model(transformers.Lfm2Config(rope_theta=1e6, **kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = Lfm2Model(Lfm2Config(rope_theta=1e6, **kw)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_backbone_matches_transformers_prefill_and_decode():
    hf, ours = _hf_pair(["conv", "full_attention", "conv", "conv", "full_attention"])
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = hf(input_ids=ids).last_hidden_state
    assert _rel(ours(ours.embed_tokens(ids)), ref) < 1e-5
    cache = ours.new_cache(2, 32)
    steps = [ours(ours.embed_tokens(ids[:, :9]), cache)]
    steps += [ours(ours.embed_tokens(ids[:, t : t + 1]), cache) for t in range(9, 24)]
    assert _rel(torch.cat(steps, 1), ref) < 1e-5
    assert cache.lengths.tolist() == [24, 24]


@torch.no_grad()
def test_backbone_rows_at_different_positions():
    """A batch whose rows have different histories decodes as each row alone (serving)."""
    _, m = _hf_pair(["conv", "full_attention", "conv", "full_attention"])
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 300, (1, 10), generator=g), torch.randint(0, 300, (1, 6), generator=g)
    nxt = torch.randint(0, 300, (2, 1), generator=g)
    single = []
    for ids, n in ((a, nxt[:1]), (b, nxt[1:])):
        c = m.new_cache(1, 16)
        m(m.embed_tokens(ids), c)
        single.append(m(m.embed_tokens(n), c))
    batch = m.new_cache(2, 16)
    for row, ids in enumerate((a, b)):
        c = m.new_cache(1, 16)
        m(m.embed_tokens(ids), c)
        for dst, src in zip(batch.keys + batch.values + batch.conv, c.keys + c.values + c.conv):
            dst[row] = src[0]
        batch.lengths[row] = c.lengths[0]
    batch.max_len = 10
    out = m(m.embed_tokens(nxt), batch)
    assert _rel(out, torch.cat(single)) < 1e-5


@pytest.mark.skipif(not (SHARED_FIXTURE / "expected.npz").is_file(), reason=f"reference fixture not at {SHARED_FIXTURE}")
def test_parity_with_reference_fixture():
    r = subprocess.run([sys.executable, str(REPO / "bench/parity.py"), str(SHARED_FIXTURE), str(SHARED_FIXTURE / "expected.npz")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parity: ok" in r.stdout
    assert r.stdout.count(" ok") >= 15


def test_official_parameter_count():
    with torch.device("meta"):
        m = LFM2AudioModel(official_config())
    params = sum(p.numel() for p in m.parameters())
    assert params == 1_453_505_664
    assert sum(p.numel() for p in m.lfm.parameters()) == 1_170_340_608
    assert sum(p.numel() for p in m.depthformer.parameters()) == 67_645_824


def test_config_round_trip_and_unknown_keys(tmp_path):
    data = tiny_config().to_dict()
    data["brand_new_key"] = 3
    data["lfm"]["some_hf_key"] = "x"
    with pytest.warns(UserWarning, match="brand_new_key"):
        cfg = LFM2AudioConfig.from_dict(data)
    cfg.save(tmp_path / "config.json")
    with warnings.catch_warnings(record=True):
        again = LFM2AudioConfig.from_json(tmp_path / "config.json")
    assert again.to_dict() == data
    assert again.lfm.ffn_dim == 128 and official_config().lfm.ffn_dim == 8192


def test_bad_configs(tmp_path):
    with pytest.raises(InputError, match="codebook_weight"):
        LFM2AudioConfig.from_dict({"codebook_weight": "cubic"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        LFM2AudioConfig.from_json(tmp_path / "config.json")
    with pytest.raises(InputError, match="no config.json"):
        LFM2AudioConfig.from_json(tmp_path / "missing.json")


def test_load_round_trip_and_dtype(tiny_checkpoint, tiny_model):
    m = LFM2AudioModel.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    assert m.conformer.layers[0].conv.batch_norm.num_batches_tracked.dtype == torch.int64
    m32 = LFM2AudioModel.from_pretrained(tiny_checkpoint)
    for (k, a), (_, b) in zip(m32.state_dict().items(), tiny_model.state_dict().items()):
        assert torch.equal(a, b), k


def test_loading_builds_no_init_and_imports_no_compiler():
    # Initialising meta tensors imports torch._dynamo (2.7 s of a 3 s demo load on 2 cores);
    # loading builds the modules bare instead, and puts torch.nn.init back afterwards.
    code = ("import sys, torch\n"
            "from lfm2_audio.pipeline import LFM2Audio\n"
            "lfm = LFM2Audio.from_pretrained(None)\n"
            "print('torch._dynamo' in sys.modules, float(torch.nn.init.ones_(torch.zeros(2)).sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "2.0"]


def _edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_strict_loading_names_the_tensor(tiny_checkpoint, tmp_path):
    key = "lfm.layers.1.self_attn.k_proj.weight"
    d = _edited_checkpoint(tiny_checkpoint, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(InputError, match=f"missing tensors: {key}"):
        LFM2AudioModel.from_pretrained(d)
    d = _edited_checkpoint(tiny_checkpoint, tmp_path / "shape", lambda s: s.update({key: torch.zeros(3, 3)}))
    with pytest.raises(InputError, match=r"misshapen tensors: lfm.layers.1.self_attn.k_proj.weight: file \(3, 3\)"):
        LFM2AudioModel.from_pretrained(d)
    d = _edited_checkpoint(tiny_checkpoint, tmp_path / "extra", lambda s: s.update({"lfm.bogus": torch.zeros(1)}))
    with pytest.raises(InputError, match="unexpected tensors: lfm.bogus"):
        LFM2AudioModel.from_pretrained(d)
    with pytest.raises(InputError, match="neither a checkpoint directory nor a hub id"):
        LFM2AudioModel.from_pretrained(tmp_path / "nowhere" / "deep" / "x")


def test_loader_accepts_official_extras_and_untied_heads(tiny_checkpoint, tmp_path):
    """Official files carry derived buffers and may omit the dead audio head; a file with its
    own depth heads wins over a config that says tied."""

    def edit(s):
        s["codebook_offsets"] = torch.arange(8) * 2049
        s["audio_loss_weights"] = torch.ones(8)
        s.pop("audio_embedding.to_logits.weight")
        s.pop("audio_embedding.embedding_norm.weight")
        for k in range(8):
            s[f"depth_embeddings.{k}.to_logits.weight"] = torch.randn(2049, 128)

    d = _edited_checkpoint(tiny_checkpoint, tmp_path / "official", edit)
    m = LFM2AudioModel.from_pretrained(d)
    assert not m.cfg.depthformer.tie
    assert not m.depth_embeddings[0].tie


def test_bad_dtype_and_device(tiny_checkpoint):
    with pytest.raises(InputError, match="unknown dtype"):
        LFM2AudioModel.from_pretrained(tiny_checkpoint, dtype="float8")
    with pytest.raises(InputError, match="device"):
        LFM2AudioModel.from_pretrained(tiny_checkpoint, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            LFM2AudioModel.from_pretrained(tiny_checkpoint, device="cuda")


@torch.no_grad()
def test_codebooks_after_the_first_never_end_audio(tiny_model):
    """The reference lets codebooks 1..7 emit end-of-audio mid-frame; we mask it."""
    m = LFM2AudioModel(tiny_config()).eval()
    m.load_state_dict(tiny_model.state_dict())
    for k in range(1, 8):
        head = m.depth_embeddings[k]
        head.get_logits = lambda o, f=head.get_logits: f(o).index_add(-1, torch.tensor([2048]), torch.full((o.shape[0], 1), 1e3))
    h = torch.randn(16, 64)
    frame, logits = m.sample_frame(h, return_logits=True)
    assert (logits[:, 1:].argmax(-1) == 2048).all()  # raw logits would pick end-of-audio
    assert (frame[:, 1:] < 2048).all()

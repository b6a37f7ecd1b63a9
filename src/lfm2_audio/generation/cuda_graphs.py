"""CUDA graphs for the backbone steps, the depthformer frame and the audio encoder.

    engine = FastLFM2Audio(model.cuda())                # takes this path on CUDA by itself
    engine = FastLFM2Audio(model.cuda(), compile=True)  # and fuses the small ops first

At batch 1 a decode step reads ~2 GB of weights through a few hundred kernels, and a frame
runs 48 depthformer layer steps of ~30 small kernels each; the conformer and a prefill are
hundreds more. Launched one at a time from Python, launch overhead costs more than the
arithmetic, so each routine is captured once as a CUDA graph and replayed. A graph fixes every
address and shape, hence:

* Static buffers: a graph reads its input from and writes its output to buffers it owns; a
  call copies in, replays and copies out.
* Buckets: a graph serves a fixed row count; B rows run in the smallest bucket (1, 2, 4, ...,
  256, then multiples of 256) that holds them. A prefill chunk of S > 1 positions runs padded
  to a power of two (64 to 2048), the encoder's input to a multiple of 1.28 s.
* Positions on the device: each row's position is `cache.lengths` (read and advanced by the
  graph), RoPE comes from a table indexed by it and the attention mask compares key positions
  with it. Only the key range is a shape: graphs exist per power-of-two bucket (>= 256, at
  most the capacity) of `cache.max_len` plus the chunk, a bound the host already keeps.
* Real rows and positions as data: in a bucket, rows >= n are padding or (in the serving
  engine's slot cache) other sessions, and chunk positions >= s are padding; n and s are
  device scalars and every state write (conv state, K/V, lengths) keeps the old value outside
  the real ones, so nothing else is disturbed.
* Caches the graphs know: a graph bakes in one cache's K/V, conv-state and length buffers.
  `new_cache` therefore hands out row-prefix views of pooled storages (bucket rows), reusing a
  storage, zeroed, once no cache holds it; a new Conversation of a size seen before replays
  the graphs already captured, so no capture lands on the time-to-first-audio path. Other
  caches (or row views that do not start at row 0) take the eager fast path.
* Sampling inside the graph: greedy is an argmax; temperature / top-k draws its noise outside
  the graph from the caller's generator and takes argmax(p / noise) with Exp(1) noise, an
  exact draw from p: the distribution of `sample`, though not torch.multinomial's draws.
  top-p, and calls that want the logits, run the eager fast path.

Off CUDA the same functions run eagerly over the same static buffers; that is how the CPU
tests check them against the plain path. With `compile=True` the per-layer functions go
through torch.compile (symbolic sizes) before capture; if that fails (no Triton, no C
compiler), the eager functions are captured instead. Graphs for one row (the decode step of
a single stream and its audio frame) call fused.py's Triton kernels where Triton imports: a
norm, a projection and a residual add or gate in one launch, about half the launches.

Numerics: the same operations as the fast path, except that the backbone attention is one
SDPA call over the whole key bucket with an additive mask (the query heads of each KV head as
its query rows, so no GQA expansion), a prefill's conv is the decode step's fp32 tap sum, and
the depth attention sums over all 8 slots with the later ones masked; all agree with the plain
path to rounding.
"""

from __future__ import annotations

import logging
import weakref
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import DEPTH_HEADS, DEPTH_KV_HEADS, END_OF_AUDIO
from ..model.lfm2 import Lfm2Cache
from .fast import FastBackbone, FastDepth, _rms_hf, _rms_liquid
from .sampling import GREEDY, Sampling

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_KEYS = 256  # smallest key-range bucket: below it, a longer range costs less than a capture
MIN_CHUNK, MAX_CHUNK = 64, 2048  # prefill chunks: padded to a power of two in this range
MEL_STEP, MAX_MEL = 128, 3072  # encoder inputs: padded to a multiple of 1.28 s, up to 30.72 s


def batch_bucket(n: int) -> int:
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    step = BATCH_BUCKETS[-1]
    return -(-n // step) * step


def chunk_bucket(n: int) -> int:
    """Positions a graph runs for n new positions per row: 1 (decode), or a padded chunk."""
    return 1 if n == 1 else max(MIN_CHUNK, 1 << (n - 1).bit_length())


def key_bucket(need: int, capacity: int) -> int:
    """Keys a step attends over when rows hold at most `need` positions (the new one included)."""
    return min(capacity, max(MIN_KEYS, 1 << (need - 1).bit_length()))


def unsupported(engine) -> str | None:
    """Why the graph path cannot run this FastLFM2Audio's weights (None: it can)."""
    linears = [engine.text_head, engine.depth.depth_linear, *engine.depth.heads]
    for layer in engine.lfm.layers:
        linears += [layer.w13, layer.w2, layer.out, layer.qkv if layer.attention else layer.in_proj]
        if not layer.attention and layer.conv_bias is not None:
            return "conv bias"
    for layer in engine.depth.layers:
        linears += [layer.qkv, layer.out, layer.w13, layer.w2]
    if any(lin.quantized or lin.weight is None for lin in linears):
        return "int8 or prepacked weights"
    if any(lin.bias is not None for lin in linears if lin is not engine.depth.depth_linear):
        return "linear biases"
    return None


def fused_kernels(device: torch.device, wanted: bool | None):
    """The `fused` module (Triton kernels) where one-row decode steps and frames should use it
    (see FastLFM2Audio's `triton`), else None."""
    if wanted is False or (wanted is None and device.type != "cuda"):
        return None
    try:
        from . import fused
    except ImportError:
        if wanted:
            raise
        log.info("Triton not importable: one-row steps run the unfused graphs")
        return None
    if device.type != "cuda" and not fused.INTERPRET:
        raise ValueError("the fused Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1")
    return fused


# ---- the step functions (compiled or not, captured or not) -----------------------------------


class ConvBlock(NamedTuple):
    op_norm: torch.Tensor
    ffn_norm: torch.Tensor
    in_proj: torch.Tensor
    out: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    taps: torch.Tensor  # [kernel, D] fp32


class AttnBlock(NamedTuple):
    op_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: torch.Tensor
    out: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    qk_norm: torch.Tensor  # [q heads + kv heads, head_dim]


def conv_step(x, w: ConvBlock, eps: float, state, keep_idx, active):
    """A backbone conv layer over S positions: x [B, S, D]; state [B, D, kernel - 1] becomes
    the gated inputs at `keep_idx` (the last kernel - 1 real ones) in active rows only."""
    proj = F.linear(_rms_hf(x, w.op_norm, eps), w.in_proj)
    x = x + F.linear(conv_mix(proj, state, w.taps, keep_idx, active), w.out)
    return _feed_forward(x, w, eps)


def conv_mix(proj, state, taps, keep_idx, active):
    """The conv layer between its projections: in_proj output [B, S, 3D] -> [B, S, D]."""
    S = proj.shape[1]
    b, c, xv = proj.chunk(3, dim=-1)
    u = torch.cat((state, (b * xv).transpose(1, 2)), dim=2)  # [B, D, kernel - 1 + S]
    state.copy_(torch.where(active[:, None, None], u.index_select(2, keep_idx), state))
    # The taps summed in fp32 in the conv kernel's order, as the fast path's decode step does
    # (bit-identical to the conv with bf16 inputs).
    u32 = u.float()
    v = u32[:, :, 0:S] * taps[0][:, None]
    for i in range(1, taps.shape[0]):
        v = v + u32[:, :, i : i + S] * taps[i][:, None]
    return c * v.transpose(1, 2).to(proj.dtype)


def attention_step(x, w: AttnBlock, eps: float, qk_eps: float, heads: tuple, k_cache, v_cache, pos, cos, sin, mask, keep):
    """A backbone attention layer over S positions per row: x [B, S, D]; pos [B, S] where the
    rows write, keep [B, S] whether they do; cos/sin [B, S, hd]; k/v_cache [B, KV, T, hd] the
    key range; mask [B, 1, S*G, T] additive, rows in (position, group member) order."""
    qkv = F.linear(_rms_hf(x, w.op_norm, eps), w.qkv)
    x = x + F.linear(attention_mix(qkv, w.qk_norm, qk_eps, heads, k_cache, v_cache, pos, cos, sin, mask, keep), w.out)
    return _feed_forward(x, w, eps)


def attention_mix(qkv, qk_norm, qk_eps: float, heads: tuple, k_cache, v_cache, pos, cos, sin, mask, keep):
    """The attention layer between its projections: qkv [B, S, (H + 2 KV) hd] -> [B, S, H hd]."""
    H, KV, hd = heads
    B, S, _ = qkv.shape
    G = H // KV
    qk = qkv[..., : (H + KV) * hd].view(B, S, H + KV, hd)
    qk = qk_norm * F.rms_norm(qk.float(), (hd,), None, qk_eps).to(qkv.dtype)
    x1, x2 = qk.chunk(2, dim=-1)
    qk = qk * cos[:, :, None] + torch.cat((-x2, x1), dim=-1) * sin[:, :, None]  # rotate-half RoPE
    v = qkv[..., (H + KV) * hd :].view(B, S, KV, hd)
    rows = torch.arange(B, device=qkv.device)[:, None]
    keep = keep[:, :, None, None]
    k_cache[rows, :, pos] = torch.where(keep, qk[:, :, H:], k_cache[rows, :, pos])
    v_cache[rows, :, pos] = torch.where(keep, v, v_cache[rows, :, pos])
    # Each KV head's G query heads (times S positions) as its query rows: plain SDPA, no GQA
    # expansion of the keys.
    q = qk[:, :, :H].reshape(B, S, KV, G, hd).transpose(1, 2).reshape(B, KV, S * G, hd)
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
    return out.view(B, KV, S, G, hd).transpose(1, 2).reshape(B, S, H * hd)


def _feed_forward(x, w, eps: float):
    a, b = F.linear(_rms_hf(x, w.ffn_norm, eps), w.w13).chunk(2, dim=-1)
    return x + F.linear(F.silu(a) * b, w.w2)


def depth_step(x, w: AttnBlock, eps: float, qk_eps: float, k_cache, v_cache, slot, cos, sin, slot_bias):
    """A depthformer layer at codebook slot `slot` ([1] index): x [B, dim]; fp32 caches
    [B, KV, K, hd] hold every slot; slot_bias [K] is -inf on the slots after this one."""
    H, KV = DEPTH_HEADS, DEPTH_KV_HEADS
    B, hd = x.shape[0], k_cache.shape[-1]
    qkv = F.linear(_rms_liquid(x, w.op_norm, eps), w.qkv)
    qk = qkv[:, : (H + KV) * hd].view(B, H + KV, hd)
    qk = (F.rms_norm(qk.float(), (hd,), None, qk_eps) * w.qk_norm).to(x.dtype).float()
    swapped = qk.view(B, H + KV, hd // 2, 2).flip(-1).view(B, H + KV, hd)
    qk = (qk * cos + swapped * sin).to(x.dtype)  # interleaved-pair RoPE
    k_cache.index_copy_(2, slot, qk[:, H:, None].float())
    v_cache.index_copy_(2, slot, qkv[:, (H + KV) * hd :].view(B, KV, 1, hd).float())
    q = qk[:, :H].reshape(B, KV, H // KV, 1, hd).float()
    p = ((q * k_cache[:, :, None]).sum(-1) * hd**-0.5 + slot_bias).softmax(-1)  # [B, KV, G, K]
    att = (p[..., None] * v_cache[:, :, None]).sum(-2).reshape(B, H * hd).to(x.dtype)
    x = x + F.linear(att, w.out)
    a, b = F.linear(_rms_liquid(x, w.ffn_norm, eps), w.w13).chunk(2, dim=-1)
    return x + F.linear(F.silu(a) * b, w.w2)


def pick(logits, temperature=None, noise=None, top_k: int = 0):
    """Greedy (temperature None) or a draw from softmax(logits / temperature), restricted to
    the top_k (0: all), as argmax(p / noise) with noise ~ Exp(1)."""
    if temperature is None:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_k:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return (scaled.softmax(-1) / noise).argmax(-1)


def depth_head(x, norm, eps: float, head, eoa_bias, embed, z_next, temperature, noise, top_k: int):
    """Codebook logits, the code, and the next slot's input z_next + embed[code]."""
    logits = F.linear(_rms_liquid(x, norm, eps), head) + eoa_bias
    code = pick(logits, temperature, noise, top_k)
    return code, z_next + F.embedding(code, embed)


class Kernels:
    """The step functions the graphs call: compiled, or as written (also the fallback)."""

    def __init__(self, compile: bool):
        self.use(compile)

    def use(self, compile: bool) -> None:
        fns = (conv_step, attention_step, depth_step, depth_head, conv_mix, attention_mix)
        if compile:
            fns = tuple(torch.compile(f, dynamic=True, fullgraph=True) for f in fns)
        self.conv, self.attention, self.depth, self.head, self.conv_mix, self.attention_mix = fns
        self.compiled = compile


def graph_pool(owner, device: torch.device):
    """owner's CUDA graph memory pool, made on first use (None off CUDA): its graphs share it."""
    if owner._pool is None and device.type == "cuda":
        owner._pool = torch.cuda.graph_pool_handle()
    return owner._pool


class Replay:
    """body() over static buffers: captured as a CUDA graph on CUDA, called as is elsewhere.
    The body must leave all state alone on its warm-up run (the callers arrange that)."""

    def __init__(self, body, device: torch.device, kernels: Kernels, pool=None):
        self.body, self.graph = body, None
        if device.type != "cuda":
            return
        try:
            self.graph = self._capture(device, pool)
        except Exception:
            if not kernels.compiled:
                raise
            log.warning("torch.compile failed; capturing the uncompiled step functions", exc_info=True)
            kernels.use(False)
            self.graph = self._capture(device, pool)

    def _capture(self, device, pool):
        # The warm-up compiles, autotunes and creates library handles outside the capture.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.body()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.body()
        return graph

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()


# ---- backbone ----------------------------------------------------------------------------------


class _Store:
    """A pooled cache storage of bucket rows and the graphs captured over it."""

    def __init__(self, cache: Lfm2Cache):
        self.cache = cache
        self.owner = None  # weakref to the cache handed out over it
        self.graphs: dict[tuple[int, int], SimpleNamespace] = {}

    def free(self) -> bool:
        return self.owner is None or self.owner() is None

    def fits(self, rows, capacity, dtype, device) -> bool:
        c = self.cache
        t = (c.keys or c.conv)[0]
        return (c.lengths.shape[0], c.capacity, t.dtype, t.device) == (rows, capacity, dtype, device)

    def clear(self) -> None:
        c = self.cache
        for t in c.conv + c.keys + c.values:
            t.zero_()
        c.lengths.zero_()

    def holds(self, cache: Lfm2Cache) -> bool:
        """Whether `cache` is a row-0 prefix of this storage (every buffer)."""
        mine = self.cache
        pairs = zip([cache.lengths] + cache.conv + cache.keys + cache.values,
                    [mine.lengths] + mine.conv + mine.keys + mine.values)
        return all(a.data_ptr() == b.data_ptr() for a, b in pairs)


class GraphBackbone:
    """FastBackbone with the one-position decode step replayed from CUDA graphs; prefill and
    any cache it did not hand out run the fast path."""

    def __init__(self, fast: FastBackbone, kernels: Kernels, fused=None):
        self.fast, self.kernels = fast, kernels
        self.fused = fused  # the `fused` module: one-row decode steps run its linear kernel
        self.eps = fast.eps
        self.heads, self.qk_eps = (1, 1, 1), 0.0  # (q heads, kv heads, head_dim) of the attention layers
        self.blocks = []
        for layer in fast.layers:
            common = (layer.op_norm, layer.ffn_norm)
            if layer.attention:
                self.heads = (layer.n_heads, layer.n_kv, layer.head_dim)
                self.qk_eps = layer.qk_eps
                self.blocks.append(AttnBlock(*common, layer.qkv.weight, layer.out.weight, layer.w13.weight,
                                             layer.w2.weight, layer.qk_norm))
            else:
                taps = layer.conv_weight[:, 0].float().T.contiguous()
                self.blocks.append(ConvBlock(*common, layer.in_proj.weight, layer.out.weight, layer.w13.weight,
                                             layer.w2.weight, taps))
        # Storages by the address of their lengths buffer: a row-0 view starts at the same
        # address (views made under inference_mode carry no `_base` to go by), and a pooled
        # storage is never freed, so no other tensor can start there.
        self._stores: dict[int, _Store] = {}
        self._pool = None

    def __getattr__(self, name):  # embed_tokens, base, cfg, bytes_per_step, rope, ...
        fast = self.__dict__.get("fast")
        if fast is None:
            raise AttributeError(name)
        return getattr(fast, name)

    def new_cache(self, batch: int, capacity: int, dtype=None, device=None) -> Lfm2Cache:
        """A cache for `batch` rows: rows [0, batch) of a pooled storage of bucket rows."""
        p = self.fast.base.embed_tokens.weight
        dtype, device = dtype or p.dtype, torch.device(device or p.device)
        rows = batch_bucket(batch)
        store = next((s for s in self._stores.values() if s.free() and s.fits(rows, capacity, dtype, device)), None)
        if store is None:
            store = _Store(self.fast.base.new_cache(rows, capacity, dtype, device))
            self._stores[store.cache.lengths.data_ptr()] = store
        else:
            store.clear()
        full = store.cache
        view = Lfm2Cache([t[:batch] for t in full.conv], [t[:batch] for t in full.keys],
                         [t[:batch] for t in full.values], full.lengths[:batch])
        store.owner = weakref.ref(view)
        return view

    def _store_of(self, cache: Lfm2Cache) -> _Store | None:
        store = self._stores.get(cache.lengths.data_ptr())
        return store if store is not None and store.holds(cache) else None

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, cache=None, window: int | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        span = chunk_bucket(S)
        store = self._store_of(cache) if cache is not None and window is None and S <= MAX_CHUNK else None
        if store is None or cache.max_len + span > cache.capacity:
            return self.fast(x, cache, window)
        step = self._step(store, batch_bucket(B), span, key_bucket(cache.max_len + span, cache.capacity))
        step.x[:B, :S].copy_(x)
        step.n.fill_(B)
        step.s.fill_(S)
        step.run()
        cache.max_len += S
        return step.h[:B, :S].clone()

    def _step(self, store: _Store, rows: int, span: int, keys: int) -> SimpleNamespace:
        step = store.graphs.get((rows, span, keys))
        if step is None:
            step = store.graphs[(rows, span, keys)] = self._build(store.cache, rows, span, keys)
        return step

    def _build(self, full: Lfm2Cache, rows: int, span: int, T: int) -> SimpleNamespace:
        """The graph for `rows` rows of `full`, each taking up to `span` new positions (the
        first s real) after its own history, attending over keys [0, T)."""
        ref = (full.keys or full.conv)[0]
        dtype, device = ref.dtype, ref.device
        D = self.fast.cfg.hidden_size
        G = self.heads[0] // self.heads[1]
        st = SimpleNamespace(x=torch.zeros(rows, span, D, dtype=dtype, device=device),
                             h=torch.zeros(rows, span, D, dtype=dtype, device=device),
                             n=torch.zeros((), dtype=torch.long, device=device),  # 0: the warm-up changes nothing
                             s=torch.ones((), dtype=torch.long, device=device))
        conv = [t[:rows] for t in full.conv]
        keys = [t[:rows, :, :T] for t in full.keys]
        values = [t[:rows, :, :T] for t in full.values]
        lengths = full.lengths[:rows]
        cos_table, sin_table = self.fast.rope(0, full.capacity, dtype, device)  # views: kept alive here
        key_pos = torch.arange(T, device=device)
        offsets = torch.arange(span, device=device)
        row_ids = torch.arange(rows, device=device)
        history = torch.arange(conv[0].shape[2] if conv else 0, device=device)
        kern, fused = self.kernels, self.fused
        # One row, one position: the projections through the fused linear kernel (norms and
        # residual adds folded in), the compiled or plain ops between them.
        one_row = rows == 1 and span == 1 and fused is not None
        hf = dict(eps=self.eps, norm_style="hf")

        def body():
            active = row_ids < st.n
            keep = active[:, None] & (offsets < st.s)  # [rows, span]: real positions of active rows
            pos = (lengths[:, None] + offsets).clamp(max=T - 1)  # only rows >= n can reach past T
            cos, sin = cos_table[pos], sin_table[pos]
            visible = (key_pos <= pos[:, :, None]).repeat_interleave(G, dim=1)  # [rows, span * G, T]
            mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))[:, None]
            keep_idx = history + st.s  # the conv inputs that stay: the last kernel - 1 real ones
            x = st.x
            ci = ai = 0
            for w in self.blocks:
                if isinstance(w, ConvBlock):
                    if one_row:
                        proj = fused.linear(x, w.in_proj, norm=w.op_norm, **hf)
                        x = fused.linear(kern.conv_mix(proj, conv[ci], w.taps, keep_idx, active), w.out, residual=x)
                    else:
                        x = kern.conv(x, w, self.eps, conv[ci], keep_idx, active)
                    ci += 1
                else:
                    if one_row:
                        qkv = fused.linear(x, w.qkv, norm=w.op_norm, **hf)
                        att = kern.attention_mix(qkv, w.qk_norm, self.qk_eps, self.heads, keys[ai], values[ai], pos,
                                                 cos, sin, mask, keep)
                        x = fused.linear(att, w.out, residual=x)
                    else:
                        x = kern.attention(x, w, self.eps, self.qk_eps, self.heads, keys[ai], values[ai], pos, cos,
                                           sin, mask, keep)
                    ai += 1
                if one_row:  # the feed-forward (kern.conv / kern.attention include theirs)
                    x = fused.linear(fused.linear(x, w.w13, norm=w.ffn_norm, gate=True, **hf), w.w2, residual=x)
            st.h.copy_(_rms_hf(x, self.fast.final_norm, self.eps))
            lengths.add_(active * st.s)

        st.run = Replay(body, device, kern, graph_pool(self, device))
        return st


# ---- depthformer -------------------------------------------------------------------------------


class GraphDepth:
    """FastDepth whose frame (depth_linear, 8 codebook steps, sampling) is one graph replay."""

    def __init__(self, fast: FastDepth, kernels: Kernels, fused=None):
        self.fast, self.kernels = fast, kernels
        self.fused = fused  # the `fused` module: one-row frames run its Triton kernels
        self.K, self.dim, self.head_dim = fast.K, fast.dim, fast.head_dim
        self.blocks = [AttnBlock(l.op_norm, l.ffn_norm, l.qkv.weight, l.out.weight, l.w13.weight, l.w2.weight, l.qk_norm)
                       for l in fast.layers]
        self.eps, self.qk_eps = fast.layers[0].eps, fast.layers[0].qk_eps
        self.heads = [h.weight for h in fast.heads]
        device, dtype = self.heads[0].device, self.heads[0].dtype
        K = self.K
        self.slots = torch.arange(K, device=device)
        self.slot_bias = torch.full((K, K), float("-inf"), device=device).triu(1)  # row k: slots > k hidden
        self.vocab = self.heads[0].shape[0]
        self.eoa_bias = torch.zeros(2, self.vocab, dtype=dtype, device=device)  # row 1: codebooks 1..
        self.eoa_bias[1, END_OF_AUDIO] = float("-inf")
        self._graphs: dict[tuple, SimpleNamespace] = {}
        self._pool = None

    def __getattr__(self, name):  # bytes_per_frame, exact, ...
        fast = self.__dict__.get("fast")
        if fast is None:
            raise AttributeError(name)
        return getattr(fast, name)

    @torch.inference_mode()
    def frame(self, h: torch.Tensor, params: Sampling = GREEDY, generator=None, return_logits: bool = False):
        top_p = params.top_p is not None and params.top_p < 1.0
        if return_logits or (top_p and not params.greedy):
            return self.fast.frame(h, params, generator, return_logits)
        B = h.shape[0]
        top_k = 0 if params.greedy or params.top_k is None or params.top_k >= self.vocab else params.top_k
        key = (batch_bucket(B), params.greedy, top_k, h.dtype)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._build(*key)
        g.h[:B].copy_(h)
        if not params.greedy:
            g.temperature.fill_(params.temperature)
            g.noise.exponential_(generator=generator)
        g.run()
        return g.codes[:B].clone()

    def _build(self, rows: int, greedy: bool, top_k: int, dtype) -> SimpleNamespace:
        fast, K, device = self.fast, self.K, self.slots.device
        shape = (rows, DEPTH_KV_HEADS, K, self.head_dim)
        st = SimpleNamespace(
            h=torch.zeros(rows, self.depth_linear.weight.shape[1], dtype=dtype, device=device),
            codes=torch.zeros(rows, K, dtype=torch.long, device=device),
            kv=[(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in self.blocks],
            temperature=None if greedy else torch.ones((), device=device),
            noise=None if greedy else torch.ones(rows, K, self.vocab, device=device))
        kern = self.kernels
        lin = fast.depth_linear
        if rows == 1 and self.fused is not None:
            st.run = Replay(self._fused_body(st, top_k), device, kern, graph_pool(self, device))
            return st

        def body():
            z = F.linear(st.h, lin.weight, lin.bias).view(rows, K, self.dim)
            x = z[:, 0]
            codes = []
            for k in range(K):
                slot = self.slots[k : k + 1]
                for w, (kc, vc) in zip(self.blocks, st.kv):
                    x = kern.depth(x, w, self.eps, self.qk_eps, kc, vc, slot, fast.cos2[k], fast.sin2[k], self.slot_bias[k])
                noise = None if st.noise is None else st.noise[:, k]
                code, x = kern.head(x, fast.head_norm[k], fast.head_eps, self.heads[k], self.eoa_bias[min(k, 1)],
                                    fast.embed[k], z[:, (k + 1) % K], st.temperature, noise, top_k)
                codes.append(code)
            st.codes.copy_(torch.stack(codes, dim=1))

        st.run = Replay(body, device, kern, graph_pool(self, device))
        return st

    def _fused_body(self, st: SimpleNamespace, top_k: int):
        """The frame of one row through the fused kernels: 5 launches a layer step."""
        fast, fused, K = self.fast, self.fused, self.K
        lin = fast.depth_linear

        def body():
            z = fused.linear(st.h, lin.weight, bias=lin.bias).view(1, K, self.dim)
            x = z[:, 0]
            for k in range(K):
                for w, (kc, vc) in zip(self.blocks, st.kv):
                    x = fused.layer_step(x, w, kc, vc, k, fast.cos2[k], fast.sin2[k], self.eps, self.qk_eps, DEPTH_HEADS)
                logits = fused.linear(x, self.heads[k], norm=fast.head_norm[k], eps=fast.head_eps,
                                      bias=self.eoa_bias[min(k, 1)])
                table, z_next = (fast.embed[k], z[:, k + 1]) if k + 1 < K else (None, None)
                x = fused.pick_embed_add(logits, st.codes[:, k], table, z_next, st.temperature,
                                         None if st.noise is None else st.noise[:, k], top_k)

        return body


# ---- audio encoder ----------------------------------------------------------------------------


class GraphEncoder:
    """`encode_audio` for one clip from a graph per padded length (a multiple of MEL_STEP mel
    frames). The conformer masks every padded frame (before each convolution, in attention),
    so the padding changes nothing but rounding; more clips at once, or longer ones, run the
    model's own encode_audio."""

    def __init__(self, model):
        self.model = model
        self._graphs: dict[int, SimpleNamespace] = {}
        self._pool = None

    @torch.inference_mode()
    def __call__(self, features: list[torch.Tensor]) -> torch.Tensor:
        m = self.model
        if len(features) != 1 or not 0 < features[0].shape[-1] <= MAX_MEL:
            return m.encode_audio(features)
        f = features[0]
        T = f.shape[-1]
        padded = -(-T // MEL_STEP) * MEL_STEP
        g = self._graphs.get(padded)
        if g is None:
            g = self._graphs[padded] = self._build(padded)
        g.features[:, :T].copy_(f)
        g.features[:, T:].zero_()
        g.length.fill_(T)
        g.run()
        return g.out[: m.audio_positions(T)].clone()

    def _build(self, padded: int) -> SimpleNamespace:
        m = self.model
        n_mels = m.cfg.encoder.feat_in
        st = SimpleNamespace(features=torch.zeros(n_mels, padded, dtype=m.dtype, device=m.device),
                             length=torch.full((1,), padded, dtype=torch.long, device=m.device))
        st.out = torch.zeros(m.audio_positions(padded), m.cfg.lfm.hidden_size, dtype=m.dtype, device=m.device)

        def body():
            x, _ = m.conformer(st.features[None], st.length)
            st.out.copy_(m.audio_adapter(x[0]))

        st.run = Replay(body, m.device, Kernels(False), graph_pool(self, m.device))
        return st

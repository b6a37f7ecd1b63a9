"""Hand-written CPU kernels for decoding (cpu_kernels.c), built on first use.

A decode step multiplies one to a few activation rows by every weight matrix, so it is bound by
how fast the weights stream from memory. On a 2-core AVX2 CPU torch's bf16 GEMV and its int8
kernel reach about half of the memory bandwidth; the loops in cpu_kernels.c stream as fast as a
plain read (the file says how). The fast engine uses them for bf16 weights that oneDNN cannot
prepack (CPUs without bf16 arithmetic) and for int8 weights on any x86 CPU with AVX2: each
one-row product (`bf16_linear`, `int8_linear`), the depthformer's codebook step as one call
(`DepthStep`: every layer and the head, in place of ~250 small torch ops), and the backbone's
one-position step as one call (`BackboneStep`: every layer and the final norm, ~400 ops). More
rows (prefill, serving batches) are compute-bound: `gemm` widens a few weight rows at a time
(dot-product tiles below 16 rows, outer-product tiles from 16) and runs 1.2-1.6x the speed of
torch's converted fp32 GEMM for a 4 s prompt's 73 rows, and 2.4-5x its bf16 matmul at 5-16
rows, up to GEMM_MAX_ROWS (quantize.use_cpu_gemm says where).

The C file is compiled with the system C compiler into a per-user cache the first time it is
needed (about a second; the file and flags name the library, so an edit rebuilds it). No
compiler, no AVX2, or LFM2_AUDIO_CPU_KERNELS=0: `library()` is None and callers keep torch's
kernels. Results equal torch's up to the order of fp32 sums (and, for int8, the activations'
int16 rounding, ~1e-5 relative).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
# -ffp-contract=off: a * b + c stays two roundings, as in torch's elementwise ops
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]
MAX_ROWS = 4  # the C file's MAX_ROWS
# Above this many rows oneDNN's fp32 GEMM on a converted weight (converted once, where the
# kernels widen the weight again for every block of 128 rows) catches up with the kernels' GEMM:
# 2-core AVX2 EPYC, 6144 x 2048 and 2048 x 8192 weights, the kernels 1.07-1.09x at 128 rows,
# 1.13-1.17x at 192, 0.9-1.03x at 256-600.
GEMM_MAX_ROWS = 192
ENV_SWITCH = "LFM2_AUDIO_CPU_KERNELS"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lfm2-audio"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: another process may be building the same file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Linear(ctypes.Structure):
    """A weight the kernels multiply by: bf16 [n, k], or int8 [n, k] with fp32 row scales."""
    _fields_ = [("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("n", ctypes.c_int), ("k", ctypes.c_int)]


class DepthLayer(ctypes.Structure):
    _fields_ = [("qkv", Linear), ("out", Linear), ("w13", Linear), ("w2", Linear),
                ("operator_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("qk_norm", ctypes.c_void_p)]


class Depth(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("n_layers", "dim", "heads", "kv_heads", "head_dim", "slots", "ffn_dim")]
    _fields_ += [(name, ctypes.c_float) for name in ("eps", "qk_eps", "head_eps")]
    _fields_ += [(name, ctypes.c_void_p) for name in ("cos2", "sin2", "layers", "logits", "head_norm")]


class BackboneLayer(ctypes.Structure):
    _fields_ = [("attention", ctypes.c_int), ("in_", Linear), ("out", Linear), ("w13", Linear), ("w2", Linear)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("operator_norm", "ffn_norm", "qk_norm", "conv_taps")]


class Backbone(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("n_layers", "dim", "heads", "kv_heads", "head_dim", "ffn_dim", "conv_len")]
    _fields_ += [("eps", ctypes.c_float), ("qk_eps", ctypes.c_float), ("final_norm", ctypes.c_void_p),
                 ("layers", ctypes.c_void_p)]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (see the module docstring)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"CPU decode kernels unavailable, using torch's ({detail.strip()[:300]})", stacklevel=2)
        return None
    lib.lfm_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
    lib.lfm_depth_step.argtypes = [ctypes.POINTER(Depth), ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2
    lib.lfm_backbone_step.argtypes = ([ctypes.POINTER(Backbone)] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4)
    lib.lfm_gemm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
    lib.lfm_linear.restype = lib.lfm_depth_step.restype = lib.lfm_backbone_step.restype = ctypes.c_int
    lib.lfm_gemm.restype = ctypes.c_int
    lib.lfm_fma_gflops.argtypes = [ctypes.c_long, ctypes.c_int]
    lib.lfm_fma_gflops.restype = ctypes.c_double
    return lib


def usable(x2: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether these activation rows [rows, K] (and this bias) go to the kernels here."""
    return (x2.device.type == "cpu" and x2.dtype == torch.bfloat16 and 0 < x2.shape[0] <= MAX_ROWS
            and (bias is None or bias.dtype == torch.bfloat16) and library() is not None)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("a CPU decode kernel could not allocate its buffers")


def _output(x2, weight, scales32) -> torch.Tensor:
    """The bf16 [rows, N] result of x2 [rows, K] against this weight, after checking that the
    kernels can read the pair: matching columns, contiguous, and bf16, or int8 with its scales."""
    k = x2.shape[1]
    if weight.shape[1] != k or not (x2.is_contiguous() and weight.is_contiguous()):
        raise ValueError(f"rows of {k} values against a {tuple(weight.shape)} weight (both contiguous)")
    if weight.dtype != (torch.bfloat16 if scales32 is None else torch.int8):
        raise ValueError(f"the CPU kernels take a bf16 weight, or an int8 one with its scales, not {weight.dtype}"
                         f"{'' if scales32 is None else ' with scales'}")
    return torch.empty(x2.shape[0], weight.shape[0], dtype=torch.bfloat16)


def _product(entry, x2, weight, scales32, bias):
    """y = x2 @ weight.T (+ bias) through a kernel entry point that takes (weight, scales, x,
    bias, y, rows, n, k, threads): lfm_linear or lfm_gemm."""
    rows, k = x2.shape
    y = _output(x2, weight, scales32)
    _check(entry(weight.data_ptr(), _ptr(scales32), x2.data_ptr(), _ptr(bias), y.data_ptr(), rows, weight.shape[0], k,
                 torch.get_num_threads()))
    return y


def bf16_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [rows, K] @ weight [N, K].T (+ bias [N]), all bf16 and contiguous; `usable(x2)`."""
    return _product(library().lfm_linear, x2, weight, None, bias)


def int8_linear(x2: torch.Tensor, q: torch.Tensor, scales32: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [rows, K] bf16 @ (q [N, K] int8 * scales32 [N] fp32).T (+ bias [N] bf16); `usable(x2)`."""
    return _product(library().lfm_linear, x2, q, scales32, bias)


def gemm_usable(x2: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether these activation rows [rows, K] (and this bias) can go to the kernels' GEMM
    (`gemm`): more than MAX_ROWS and at most GEMM_MAX_ROWS bf16 rows. (Callers also check for
    bf16 arithmetic: with it, oneDNN's GEMM is the faster one.)"""
    return (x2.device.type == "cpu" and x2.dtype == torch.bfloat16 and MAX_ROWS < x2.shape[0] <= GEMM_MAX_ROWS
            and x2.shape[1] % 16 == 0 and (bias is None or bias.dtype == torch.bfloat16) and library() is not None)


def gemm(x2: torch.Tensor, weight: torch.Tensor, scales32: torch.Tensor | None = None,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [rows, K] bf16 @ weight.T (+ bias [N] bf16) for many rows (prefill): weight [N, K]
    bf16, or int8 times fp32 row scales; fp32 sums, rounded once to bf16. `gemm_usable(x2)`."""
    x2 = x2.contiguous()
    rows, k = x2.shape
    if not rows or not weight.shape[0] or k < 16 or k % 16:  # the shapes lfm_gemm refuses
        raise ValueError(f"the CPU GEMM takes rows of a multiple of 16 columns, not {tuple(x2.shape)} against "
                         f"{tuple(weight.shape)}")
    return _product(library().lfm_gemm, x2, weight, scales32, bias)


def fma_gflops(threads: int | None = None, seconds: float = 0.1, repeats: int = 8) -> float | None:
    """The cores' FMA peak (fp32 GFLOP/s over `threads`, default torch's), the best of `repeats`
    runs of about `seconds` each (on a shared machine another tenant can halve a run): what
    compute-bound kernels are measured against. None without the kernels."""
    lib = library()
    if lib is None:
        return None
    threads = threads or torch.get_num_threads()
    iterations = 1 << 16
    while 12 * 16 * iterations / lib.lfm_fma_gflops(iterations, 1) / 1e9 < seconds:
        iterations *= 2
    return max(lib.lfm_fma_gflops(iterations, threads) for _ in range(repeats))


def linear_struct(weight: torch.Tensor, scales32: torch.Tensor | None = None) -> Linear:
    return Linear(weight.data_ptr(), _ptr(scales32), weight.shape[0], weight.shape[1])


class DepthStep:
    """The depthformer's codebook step (every layer, then the codebook's head) as one call.

    layers: per layer a dict of Linear structs (qkv, out, w13, w2) and fp32 tensors
    (operator_norm, ffn_norm [dim], qk_norm [heads + kv_heads, head_dim]); heads: a Linear per
    codebook, head_norms their fp32 norm weights; cos2/sin2 [slots, head_dim] fp32. `keep`:
    the tensors the structs point into, held here so they outlive the structs.
    """

    def __init__(self, layers: list[dict], heads: list[Linear], head_norms: list[torch.Tensor], cos2, sin2, *,
                 heads_q: int, kv_heads: int, ffn_dim: int, eps: float, qk_eps: float, head_eps: float, keep: list):
        dim = head_norms[0].shape[0]
        self._keep = [cos2, sin2, head_norms, layers, keep]
        self._layers = (DepthLayer * len(layers))(*[
            DepthLayer(l["qkv"], l["out"], l["w13"], l["w2"], l["operator_norm"].data_ptr(), l["ffn_norm"].data_ptr(),
                       l["qk_norm"].data_ptr()) for l in layers])
        self._heads = (Linear * len(heads))(*heads)
        self._head_norms = (ctypes.c_void_p * len(head_norms))(*[t.data_ptr() for t in head_norms])
        self.depth = Depth(len(layers), dim, heads_q, kv_heads, cos2.shape[1], cos2.shape[0], ffn_dim,
                           eps, qk_eps, head_eps, cos2.data_ptr(), sin2.data_ptr(),
                           ctypes.cast(self._layers, ctypes.c_void_p), ctypes.cast(self._heads, ctypes.c_void_p),
                           ctypes.cast(self._head_norms, ctypes.c_void_p))
        self._caches = (None, None)  # (the cache list seen last, its pointer array)

    def __call__(self, slot: int, x: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x [rows, dim] bf16 contiguous: the slot's input, overwritten with the last layer's
        output; caches: per layer (k, v) fp32 [rows, kv_heads, slots, head_dim]. Returns the
        slot's logits [rows, vocab] bf16."""
        if not x.is_contiguous():
            raise ValueError("the depth step overwrites its input in place: pass a contiguous tensor")
        if self._caches[0] is not caches:
            flat = [t.data_ptr() for kv in caches for t in kv]
            self._caches = (caches, (ctypes.c_void_p * len(flat))(*flat))
        logits = torch.empty(x.shape[0], self._heads[slot].n, dtype=torch.bfloat16)
        _check(library().lfm_depth_step(ctypes.byref(self.depth), slot, x.data_ptr(), self._caches[1],
                                        logits.data_ptr(), x.shape[0], torch.get_num_threads()))
        return logits


class BackboneStep:
    """The backbone's decode step for one new position (every row at the same position) as one
    call: every layer, then the final norm.

    layers: per layer a dict: "attention" (bool), Linear structs "in" (qkv, or the conv's
    in_proj), "out", "w13", "w2", bf16 "operator_norm" and "ffn_norm" [dim], and "qk_norm" bf16
    [heads + kv_heads, head_dim] (attention) or "conv_taps" fp32 [conv_len, dim] (conv).
    """

    def __init__(self, layers: list[dict], final_norm: torch.Tensor, *, heads: int, kv_heads: int, head_dim: int,
                 ffn_dim: int, conv_len: int, eps: float, qk_eps: float, keep: list):
        self._keep = [final_norm, layers, keep]
        self._layers = (BackboneLayer * len(layers))(*[
            BackboneLayer(int(l["attention"]), l["in"], l["out"], l["w13"], l["w2"], l["operator_norm"].data_ptr(),
                          l["ffn_norm"].data_ptr(), _ptr(l.get("qk_norm")), _ptr(l.get("conv_taps")))
            for l in layers])
        self.attention = [bool(l["attention"]) for l in layers]
        self.backbone = Backbone(len(layers), final_norm.shape[0], heads, kv_heads, head_dim, ffn_dim, conv_len,
                                 eps, qk_eps, final_norm.data_ptr(), ctypes.cast(self._layers, ctypes.c_void_p))

    def state(self, cache) -> ctypes.Array | None:
        """The cache's buffers in layer order (keys, values / conv state, None), or None where
        they are not the contiguous bf16 buffers the kernel writes into."""
        keys, values, conv = iter(cache.keys), iter(cache.values), iter(cache.conv)
        flat = []
        for attention in self.attention:
            pair = (next(keys), next(values)) if attention else (next(conv), None)
            for t in pair:
                if t is not None and (t.dtype != torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu"):
                    return None
            flat += [_ptr(t) for t in pair]
        return (ctypes.c_void_p * len(flat))(*flat)

    def __call__(self, x2: torch.Tensor, state: ctypes.Array, cos: torch.Tensor, sin: torch.Tensor, position: int,
                 capacity: int) -> torch.Tensor:
        """x2 [rows, dim] bf16: the new position's inputs -> the final norm's output [rows, dim];
        writes the position's keys and values and moves the conv states on (the caller counts
        the position in the cache's lengths)."""
        out = x2.clone(memory_format=torch.contiguous_format)  # the kernel writes its result over it
        _check(library().lfm_backbone_step(ctypes.byref(self.backbone), out.data_ptr(), state, cos.data_ptr(),
                                           sin.data_ptr(), position, capacity, out.shape[0], torch.get_num_threads()))
        return out

"""Hand-written CPU kernels for one-row decode matmuls (gemv_cpu.c), built on first use.

A decode step multiplies one to a few activation rows by every weight matrix, so it is bound by
how fast the weights stream from memory. On a 2-core AVX2 CPU torch's bf16 GEMV and its int8
kernel reach about half of the memory bandwidth; the loops in gemv_cpu.c reach 70-80% of it
(the file says how). They are used by the fast engine for bf16 weights that oneDNN cannot
prepack (CPUs without bf16 arithmetic) and for int8 weights on any x86 CPU with AVX2.

The C file is compiled with the system C compiler into a per-user cache the first time it is
needed (well under a second; the file and flags name the library, so an edit rebuilds it). No
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
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared"]
MAX_ROWS = 4  # the C file's MAX_ROWS
ENV_SWITCH = "LFM2_AUDIO_CPU_KERNELS"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lfm2-audio"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"gemv_cpu-{tag}.so"
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


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (see the module docstring)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
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
    args = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
    lib.lfm_gemv_bf16.argtypes, lib.lfm_gemv_bf16.restype = args, ctypes.c_int
    lib.lfm_gemv_int8.argtypes, lib.lfm_gemv_int8.restype = [ctypes.c_void_p] + args, ctypes.c_int
    return lib


def usable(x2: torch.Tensor) -> bool:
    """Whether these activation rows [rows, K] go to the kernels here."""
    return (x2.device.type == "cpu" and x2.dtype == torch.bfloat16 and 0 < x2.shape[0] <= MAX_ROWS
            and library() is not None)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("CPU decode kernel could not allocate its activation buffer")


def bf16_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [rows, K] @ weight [N, K].T (+ bias [N]), all bf16 and contiguous; `usable(x2)`."""
    rows, k = x2.shape
    n = weight.shape[0]
    y = torch.empty(rows, n, dtype=torch.bfloat16)
    _check(library().lfm_gemv_bf16(weight.data_ptr(), x2.data_ptr(), _ptr(bias), y.data_ptr(), rows, n, k,
                                   torch.get_num_threads()))
    return y


def int8_linear(x2: torch.Tensor, q: torch.Tensor, scales32: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [rows, K] bf16 @ (q [N, K] int8 * scales32 [N] fp32).T (+ bias [N] bf16); `usable(x2)`."""
    rows, k = x2.shape
    n = q.shape[0]
    y = torch.empty(rows, n, dtype=torch.bfloat16)
    _check(library().lfm_gemv_int8(q.data_ptr(), scales32.data_ptr(), x2.data_ptr(), _ptr(bias), y.data_ptr(),
                                   rows, n, k, torch.get_num_threads()))
    return y

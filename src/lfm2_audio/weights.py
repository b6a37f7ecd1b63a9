"""Reading .safetensors files strictly and frugally, for the model and the codecs."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                     "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                     "U8": torch.uint8, "BOOL": torch.bool}


INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                  "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def empty_modules():
    """Build modules on the meta device with no initialisation: every value comes from a
    checkpoint. Initialising meta tensors goes through torch's Python reference kernels, whose
    first call imports torch._dynamo: 2.7 s of a 3 s load on a 2-core CPU, for nothing. Factory
    calls in a module's __init__ (buffers) should name their device for the same reason."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    try:
        for name in INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file and the offset where tensor data starts."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable safetensors file: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensors(path: Path, keys: list[str], dtype=None, device="cpu"):
    """Yield (key, tensor) reading one tensor at a time with plain reads (no mmap), converting
    floating tensors to `dtype`: peak memory is the model plus its largest tensor."""
    header, start = safetensors_header(path)
    with open(path, "rb") as f:
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):
            info = header[key]
            begin, end = info["data_offsets"]
            src = SAFETENSORS_DTYPES.get(info["dtype"])
            if src is None:
                raise InputError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
            buf = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise InputError(f"{path} is truncated (tensor {key})")
            t = torch.frombuffer(buf, dtype=src) if buf else torch.empty(0, dtype=src)
            t = t.reshape(info["shape"])
            if t.is_floating_point() and dtype is not None:
                t = t.to(dtype)
            yield key, t.to(device)


def tensor_shapes(path: Path) -> dict[str, tuple]:
    header, _ = safetensors_header(path)
    return {k: tuple(v["shape"]) for k, v in header.items()}


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], what: str,
                  optional: tuple[str, ...] = (), ignored: tuple[str, ...] = ()) -> None:
    """Raise one InputError naming every missing, unexpected or misshapen tensor.

    `optional` prefixes may be absent from the file; `ignored` names may be present in it."""
    missing = [k for k in expected if k not in found and not k.startswith(optional)]
    unexpected = [k for k in found if k not in expected and k not in ignored]
    misshapen = [f"{k}: file {found[k]} vs model {expected[k]}" for k in expected
                 if k in found and tuple(found[k]) != tuple(expected[k])]

    def listed(names, sep=", "):
        return sep.join(names[:20]) + (" ..." if len(names) > 20 else "")

    problems = []
    if missing:
        problems.append("missing tensors: " + listed(missing))
    if unexpected:
        problems.append("unexpected tensors: " + listed(unexpected))
    if misshapen:
        problems.append("misshapen tensors: " + listed(misshapen, "; "))
    if problems:
        raise InputError(f"{what}: " + " | ".join(problems))


def load_state(path: Path, module: torch.nn.Module, what: str, dtype=None, device="cpu", **check) -> dict:
    """Check a file against a module's state dict and read it: {name: tensor}."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = tensor_shapes(path)
    check_tensors(expected, found, what, **check)
    return dict(read_tensors(path, [k for k in found if k in expected], dtype, device))


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data

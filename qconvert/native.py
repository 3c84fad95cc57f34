"""C sources compiled once per machine by the system C compiler and loaded with ctypes.

A library is built into `$XDG_CACHE_HOME/qconvert/kernels/` (default ~/.cache/qconvert/kernels) under
the hash of its source and flags, so a changed source is rebuilt and an unchanged one never is. It is
compiled in a temporary folder beside its final place and renamed there: whole or not at all, and two
processes building at once rename the same bytes. Where it cannot be built or loaded (no compiler, a
CPU without AVX2) `load` returns None and the caller keeps its torch code.
"""

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


def load(name: str, source: str, flags: tuple[str, ...] = AVX2_FLAGS) -> ctypes.CDLL | None:
    """The library built from `source` with `flags`, or None where it cannot be built or run here.

    Callers cache the result (`functools.cache`) and set each function's argtypes and restype.
    """
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qconvert" / "kernels"
    library = folder / f"{name}-{digest}.so"
    try:
        if not library.exists():
            _build(library, source, flags)
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError):
        return None


def _build(library: Path, source: str, flags: tuple[str, ...]) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        code, built = Path(scratch) / f"{library.stem}.c", Path(scratch) / library.name
        code.write_text(source)
        subprocess.run(["cc", *flags, str(code), "-o", str(built)], check=True, capture_output=True, timeout=120)
        built.replace(library)


def check_tensor(t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    """The C code reads raw memory: refuse a tensor of another shape, dtype or layout.

    Raises:
        ValueError: `t` is not a contiguous `dtype` tensor of `shape`.
    """
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(
            f"expected a contiguous {dtype} tensor of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}"
        )

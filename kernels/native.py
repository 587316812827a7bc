"""The native CPU kernels (``csrc/*.c``): built with the system C compiler at first use, loaded with ctypes.

Why: on a CPU a small tensor operation costs a few microseconds whatever its size, and the
shape-invariant PyTorch references spend two dozen of them on one row's attention, half a dozen on
an RMSNorm or a RoPE. Each C kernel does the same computation in one call, row by row, so a row's
result does not depend on what shares the call (each file says how). The fast path
(``models.matmul.FAST_PATH``) takes them for every CPU forward; with it off the references serve.

The sources are compiled together for this CPU (``-march=native``; ``cc``, or ``$CC``) into
``$TRISERVE_CACHE`` (default ``~/.cache/triserve``), keyed by the sources, the flags and the CPU's
feature flags, so machines that share a home directory never load each other's builds. Without a
compiler the references serve and a warning says so once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.[ch]"))
# -ffp-contract=fast: products and sums fused where the compiler sees them, the same way in every
# call (rope.c and rmsnorm.c turn it off for themselves: they reproduce torch's separately rounded
# operations)
# -fopenmp: the packed products' threads (amx, dpbf16, fma32, int8), on the OpenMP runtime torch's
# CPU build already loaded
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
LANES = 16  # csrc/common.h's vector width
MAX_HEAD = 1024  # csrc/rope.c: the widest head it rotates
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # csrc/common.h's dtype codes

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    # q, q_stride, k, k_stride, v, v_stride, k_cache, v_cache, out, hq, hkv, d, segments, segment table,
    # prefix slots, slot stride, scale, dtype, threads
    "segment_attention": (_int, [_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr,
                                 _ptr, _i64, _f32, _int, _i64]),
    # x, x_stride, weight, out, rows, width, eps, dtype
    "rms_norm": (_int, [_ptr, _i64, _ptr, _ptr, _i64, _i64, _f32, _int]),
    # q, q_stride, k, k_stride, cos, sin, scale, out, rows, hq, hkv, d, dtype
    "rope": (None, [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int]),
    # struct model *, struct step * (models/native_forward.py builds them)
    "decoder_forward": (_int, [_ptr, _ptr]),
    "amx_ready": (_int, []),
    # weight, n, k, packed
    "amx_pack": (None, [_ptr, _i64, _i64, _ptr]),
    # in, rows, packed, n, k, out, threads
    "amx_gemm": (None, [_ptr, _i64, _ptr, _i64, _i64, _ptr, _i64]),
    "dpbf16_ready": (_int, []),
    "dpbf16_pack": (None, [_ptr, _i64, _i64, _ptr]),
    "dpbf16_gemm": (None, [_ptr, _i64, _ptr, _i64, _i64, _ptr, _i64]),
    "fma32_ready": (_int, []),
    "fma32_pack": (None, [_ptr, _i64, _i64, _ptr]),
    "fma32_gemm": (None, [_ptr, _i64, _ptr, _i64, _i64, _ptr, _i64]),
    "int8_ready": (_int, []),
    "int8_packed_bytes": (_i64, [_i64, _i64]),
    "int8_work_bytes": (_i64, [_i64, _i64]),
    # fp32 weight, n, k, packed
    "int8_pack": (None, [_ptr, _i64, _i64, _ptr]),
    # in, dtype, rows, packed, n, k, out, threads, work
    "int8_gemm": (None, [_ptr, _int, _i64, _ptr, _i64, _i64, _ptr, _i64, _ptr]),
    # fp32 sums, count, out, dtype
    "store_rows": (None, [_ptr, _i64, _ptr, _int]),
    # x, rows, width, row stride, dtype, out
    "row_argmax": (None, [_ptr, _i64, _i64, _i64, _int, _ptr]),
    # x, rows, width, row stride, dtype, exclude, token, prob
    "row_confidence": (None, [_ptr, _i64, _i64, _i64, _int, _i64, _ptr, _ptr]),
    # x, rows, width, row stride, dtype, exclude, index, prob
    "row_top2": (None, [_ptr, _i64, _i64, _i64, _int, _i64, _ptr, _ptr]),
}  # fmt: skip


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for source in SOURCES:
        key.update(source.name.encode() + source.read_bytes())
    key.update(" ".join([compiler, *FLAGS]).encode() + _cpu_flags().encode())
    root = Path(os.environ.get("TRISERVE_CACHE") or Path.home() / ".cache" / "triserve")
    return root / "kernels" / f"native-{key.hexdigest()[:16]}.so"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, then loaded from the cache), or None without a compiler."""
    return load(os.environ.get("CC", "cc"))


def load(compiler: str) -> ctypes.CDLL | None:
    """Build the kernels with ``compiler`` unless their cached build exists, and load them; None (and
    a warning) when they cannot be built."""
    path = _library_path(compiler)
    if not path.exists():
        partial = None
        sources = [str(s) for s in SOURCES if s.suffix == ".c"]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # built beside its final name and renamed: processes that build it at once never read half a file
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as tmp:
                partial = Path(tmp.name)
            subprocess.run([compiler, *FLAGS, *sources, "-o", str(partial)], check=True, capture_output=True)
            os.replace(partial, path)
        except (OSError, subprocess.CalledProcessError) as error:
            if partial is not None:
                partial.unlink(missing_ok=True)
            detail = getattr(error, "stderr", None) or error
            log.warning("no native CPU kernels (%s); the PyTorch references serve", detail)
            return None
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels can take these tensors: on the CPU, all of one dtype they support,
    and the library built. (Called per layer: plain checks, no generator.)"""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in DTYPES:
        return False
    for other in tensors[1:]:
        if other.dtype is not first.dtype:
            return False
    return library() is not None


def int64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernels read index arrays: int64, contiguous (itself when it already is)."""
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def row_stride(x: torch.Tensor) -> int:
    """The row stride of [T, D] or [T, H, D] whose rows are each laid out contiguously."""
    strides = x.stride()
    if strides[-1] != 1 or (x.dim() == 3 and strides[1] != x.shape[2]) or x.dim() > 3:
        raise ValueError("a native kernel needs each row contiguous")
    return strides[0]


def _ready(kernel: str) -> bool:
    """Whether the library built and its ``<kernel>_ready()`` says this CPU runs the kernel."""
    lib = library()
    return lib is not None and getattr(lib, f"{kernel}_ready")() == 1


@functools.cache
def amx_ready() -> bool:
    """Whether csrc/amx_gemm.c can run here: the library built, the CPU has AMX-BF16 and Linux granted
    this process the tile registers."""
    return _ready("amx")


def amx_fits(n: int, k: int) -> bool:
    """Whether the AMX kernel takes a [n, k] weight: it passes over 64 output columns and 32 inputs at a time."""
    return n % 64 == 0 and k % 32 == 0 and amx_ready()


@functools.cache
def dpbf16_ready() -> bool:
    """Whether csrc/dpbf16_gemm.c can run here: the library built, the CPU has AVX512-BF16 and the OS
    saves its registers."""
    return _ready("dpbf16")


def dpbf16_fits(n: int, k: int) -> bool:
    """Whether the AVX512-BF16 kernel takes a [n, k] weight: it passes over 64 output columns and pairs
    of inputs at a time."""
    return n % 64 == 0 and k % 2 == 0 and dpbf16_ready()


@functools.cache
def fma32_ready() -> bool:
    """Whether csrc/fma32_gemm.c can run here: the library built, the CPU has AVX-512 and the OS saves
    its registers."""
    return _ready("fma32")


def fma32_fits(n: int, k: int) -> bool:
    """Whether the fp32 kernel takes a [n, k] weight: it passes over 64 output columns at a time."""
    return n % 64 == 0 and k > 0 and fma32_ready()


@functools.cache
def int8_ready() -> bool:
    """Whether csrc/int8_gemm.c can run here: the library built, the CPU has AVX512-VNNI and the OS
    saves its registers."""
    return _ready("int8")


def int8_fits(n: int, k: int) -> bool:
    """Whether the int8 kernel takes a [n, k] weight: it passes over 32 output columns and quantizes
    rows 16 values at a time."""
    return n % 32 == 0 and k % 16 == 0 and int8_ready()

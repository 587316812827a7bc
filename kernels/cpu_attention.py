"""Segment attention on the CPU in one native call (``csrc/segment_attention.c``), built at first use.

Why: the PyTorch reference (kernels/segment_attention.py) keeps a row's result independent of the
call's shape with some 25 tensor operations a layer, each a few microseconds on a CPU, so one AR
row's attention cost about 170 us a layer, far more than its arithmetic. The C kernel does the same
computation row by row and gets the invariance by construction: a row's scores, softmax and
weighted sum run the same instructions on the same values whatever else is in the call (see the
comment atop the C file). It agrees with the reference to float rounding, not bit for bit, so
the two never mix within one process's serving: the fast path (``models.matmul.FAST_PATH``) takes
this kernel for every CPU forward, the reference serves with the fast path off.

The source is compiled with the system C compiler (``cc``, or ``$CC``) for this CPU
(``-march=native``) into ``$TRISERVE_CACHE`` (default ``~/.cache/triserve``), keyed by the source,
the flags and the CPU's feature flags, so machines that share a home directory never load each
other's builds. Without a compiler the reference serves and a warning says so once.
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

from kernels.masks import MaskKind
from kernels.segment_attention import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "segment_attention.c"
# -ffp-contract=fast: products and sums fused where the compiler sees them, the same way in every call
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=gnu11"]
LANES = 16  # the C file's vector width: a head dimension must be a multiple of it
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


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
    for part in (SOURCE.read_bytes(), " ".join([compiler, *FLAGS]).encode(), _cpu_flags().encode()):
        key.update(part)
    root = Path(os.environ.get("TRISERVE_CACHE") or Path.home() / ".cache" / "triserve")
    return root / "kernels" / f"segment_attention-{key.hexdigest()[:16]}.so"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use, then loaded from the cache), or None without a compiler."""
    return load(os.environ.get("CC", "cc"))


def load(compiler: str) -> ctypes.CDLL | None:
    """Build the kernel with ``compiler`` unless its cached build exists, and load it; None (and a
    warning) when it cannot be built."""
    path = _library_path(compiler)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # built beside its final name and renamed: processes that build it at once never read half a file
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True)
            os.replace(partial, path)
        except (OSError, subprocess.CalledProcessError) as error:
            partial.unlink(missing_ok=True)
            detail = getattr(error, "stderr", None) or error
            log.warning("no native CPU attention (%s); the PyTorch reference serves", detail)
            return None
    lib = ctypes.CDLL(str(path))
    fn = lib.segment_attention
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, ctypes.c_float,
                   ctypes.c_int]  # fmt: skip
    return lib


def supports(q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the native kernel can take this call: CPU tensors of one supported dtype, heads of a
    width the kernel's vectors divide, no more than 64 query heads per KV head, contiguous caches."""
    return (
        q.device.type == "cpu"
        and q.dtype in _DTYPES
        and k.dtype == q.dtype
        and k_cache.dtype == q.dtype
        and q.shape[-1] % LANES == 0
        and q.shape[1] <= 64 * k.shape[1]
        and k_cache.is_contiguous()
        and library() is not None
    )


def _segments(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [(s.q_start, s.q_len, s.prefix_len, int(s.kind is MaskKind.CAUSAL)) for s in meta.segments]
    table = meta.prefix_slots
    if table.dtype != torch.int64 or not table.is_contiguous():
        table = table.to(torch.int64).contiguous()
    return torch.tensor(rows, dtype=torch.int64).reshape(-1), table


def _rows(x: torch.Tensor) -> int:
    """The row stride of [T, H, D] with heads packed in a row (views of a fused projection are)."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        raise ValueError("the native attention needs each row's heads contiguous")
    return x.stride(0)


def segment_attention_native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """``segment_attention_reference``'s contract (q [T, Hq, D]; k, v [T, Hkv, D]; caches [slots, Hkv,
    D] -> [T, Hq, D] in q's dtype, fp32 arithmetic; rows no segment covers are left unset), computed
    by the native kernel; call only where ``supports`` holds."""
    t, hq, d = q.shape
    out = torch.empty((t, hq, d), dtype=q.dtype)
    segments, table = meta.derived("native", lambda: _segments(meta))
    if not v_cache.is_contiguous():
        raise ValueError("the native attention needs contiguous caches")
    status = library().segment_attention(
        q.data_ptr(), _rows(q), k.data_ptr(), _rows(k), v.data_ptr(), _rows(v), k_cache.data_ptr(),
        v_cache.data_ptr(), out.data_ptr(), hq, k.shape[1], d, len(meta.segments), segments.data_ptr(),
        table.data_ptr(), table.shape[1], scale, _DTYPES[q.dtype],
    )  # fmt: skip
    if status != 0:  # -1: no memory for the scratch keys; -2: a shape ``supports`` turns away
        raise RuntimeError(f"native attention failed with status {status}")
    return out

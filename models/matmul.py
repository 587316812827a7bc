"""Matrix products of the forward: a row's result never depends on how many rows share the call.

That invariance is what keeps self-speculation lossless (a verify row must round exactly like the
AR step it replaces) and lets a request compute the same thing alone or in any batch. Products go
through ``kernels.linear`` (MKL on padded rows on CPU, a fixed-tiling Triton kernel on CUDA; see
kernels/matmul.py), except on the CPU fast path (inference), where each weight gets one backend
for every call, whatever its row count:

- **BLAS on a transposed copy** (fp32): ``torch.mm(x, weight.T)`` with the transpose made contiguous
  once. Measured on an AMX Xeon (one thread, the bundled model's shapes), it takes 1.6-16 us a call
  at 1 row where oneDNN's packed product takes 15-45 us (oneDNN spends about 15 us on any call), and
  less at 32 rows too; on an AVX2 EPYC a token's 25 products took 3.0-3.5 ms against 4.8-5.3.
- **AMX tiles on a packed copy** (bf16 on a CPU with AMX, ``Amx``): triserve's own kernel, 2-8x
  faster than MKL's or oneDNN's bf16 products at the row counts decoding uses, for weights whose
  shape it takes (a multiple of 64 outputs, of 32 inputs).
- **oneDNN with a pre-packed weight** (other bf16 weights where the CPU computes bf16 in hardware;
  fp32 where BLAS does not probe invariant). In bf16 BLAS has no such edge (about 20 us a call
  either way) and oneDNN's packed products are 2-3x faster at 32 rows and more.

Backends pick kernels by row count, and some round differently: one thread of MKL rounds a lone row
otherwise than two or more; on an AMX Xeon, oneDNN's bf16 products reducing over 768 or more inputs
give other bits in calls of more than 32 rows (some sizes only, and where the switch happens depends
on the thread count). So each backend, shape, dtype and thread count is probed once, when a weight
of it is first prepared, on batches of 64 rows against the same rows computed in calls of 8: calls of
fewer rows than the smallest count from which all agree are padded to it, and calls are split into
pieces of at most ``max_rows`` rows (8, 16, 32 or 64: the largest up to which every call agreed;
larger calls are never trusted unprobed). A backend none of whose calls of 8 rows or fewer agree is
not used. Every backend keeps a second copy of the weights in memory.

The fast path also fuses projections that read the same input (q/k/v, gate/up) into one call.
Fused and prepared weights are derived from the model's own parameters (the checkpoint format is
unchanged) and rebuilt when a parameter changes (a training step, a reload).
``TRISERVE_FAST_PATH=0`` turns the backends and fusion off; training (gradients on) never uses them.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import os
from collections.abc import Callable

import torch

import kernels
from kernels import native
from kernels.matmul import PIECE_ROWS, ROW_MULTIPLE, pad_rows

FAST_PATH = os.environ.get("TRISERVE_FAST_PATH", "1").strip() != "0"
PROBE_ROWS = PIECE_ROWS  # row counts probed per shape, as the padded reference's pieces; larger calls are split
PROBE_BATCHES = 4

Product = Callable[[torch.Tensor], torch.Tensor]


def cpu_has_fast_half() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX); without it a bf16 forward
    converts every operand and costs about twice an fp32 one."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Blas:
    """``x @ weight.T`` as BLAS computes ``torch.mm`` on a transposed copy (kept: the native forward,
    models/native_forward.py, multiplies the same copy with the same BLAS call)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.transposed = weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.transposed)


@functools.cache
def blas_function(name: str) -> int | None:
    """The address of a BLAS function of libtorch_cpu (MKL in x86 wheels), None where it has none."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


_GEMM_BF16 = ctypes.CFUNCTYPE(None, *[ctypes.c_int] * 6, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                              ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int)  # fmt: skip
ROW_MAJOR, NO_TRANSPOSE, TRANSPOSE = 101, 111, 112  # CBLAS's enums


class MklBf16:
    """``x @ weight.T`` of bf16 operands through MKL's ``cblas_gemm_bf16bf16f32`` (fp32 sums, rounded
    once to bf16): the product the native forward calls from C for bf16 models (oneDNN's packed
    product has no C entry point); kept here so the probes can test it like the others."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.contiguous()
        self.gemm = _GEMM_BF16(blas_function("cblas_gemm_bf16bf16f32"))

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 sums before rounding: what the probes compare, since rounding to bf16 hides most
        differences of summation order (a lone row's call, a GEMV, sums otherwise than calls of two
        or more rows, which the rounded outputs showed on too few of the probe's values)."""
        (n, k), rows = self.weight.shape, x.shape[0]
        out = torch.empty((rows, n), dtype=torch.float32)
        self.gemm(ROW_MAJOR, NO_TRANSPOSE, TRANSPOSE, rows, n, k, 1.0, x.data_ptr(), k, self.weight.data_ptr(), k,
                  0.0, out.data_ptr(), n)  # fmt: skip
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.sums(x).to(torch.bfloat16)


class Packed:
    """``x @ weight.T`` through one of triserve's own kernels on a weight packed once into the kernel's
    layout (fp32 sums, rounded once to bf16 for bf16 operands). MKL's GEMMs repack the weight on every
    call (and run generic code on AMD CPUs); oneDNN's packed product spends about 15 us on any call.
    Each row's sums are added in one fixed order whatever the row count (the probes confirm it: no
    padding, pieces of 64 rows). The native forward calls the same kernel on the same packed copy.
    ``kernel`` names the C functions (``<kernel>_pack``, ``<kernel>_gemm``) and kernels.native's
    ``<kernel>_fits``; ``dtype`` is the operands' dtype."""

    kernel: str
    dtype: torch.dtype

    def __init__(self, weight: torch.Tensor) -> None:
        self.n, self.k = weight.shape
        if weight.dtype != self.dtype or not getattr(native, f"{self.kernel}_fits")(self.n, self.k):
            shape = tuple(weight.shape)
            raise ValueError(f"the {self.kernel} kernel takes no {weight.dtype} weight of shape {shape} here")
        self.packed = torch.empty(self.n * self.k, dtype=self.dtype)
        # held: a temporary copy (a tensor-parallel shard is a strided view) would be freed before the call
        values = weight.detach().contiguous()
        getattr(native.library(), f"{self.kernel}_pack")(values.data_ptr(), self.n, self.k, self.packed.data_ptr())

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 sums before rounding (what the probes compare)."""
        if x.dtype != self.dtype or x.shape[-1] != self.k:
            got = f"{x.dtype} rows of {x.shape[-1]}"
            raise TypeError(f"the {self.kernel} product takes {self.dtype} rows of {self.k}, not {got}")
        x = x.contiguous()
        out = torch.empty((x.shape[0], self.n), dtype=torch.float32)
        getattr(native.library(), f"{self.kernel}_gemm")(
            x.data_ptr(), x.shape[0], self.packed.data_ptr(), self.n, self.k, out.data_ptr(), torch.get_num_threads()
        )
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.sums(x).to(self.dtype)


class Amx(Packed):
    """On AMX tiles (``kernels/csrc/amx_gemm.c``). On an AMX Xeon (one thread, the bundled model's
    shapes) it takes 2.5-7 us a call at 1-8 rows against MKL's 14-60, and 4-14 against 15-69 at 32 rows."""

    kernel, dtype = "amx", torch.bfloat16


class Dpbf16(Packed):
    """On AVX512-BF16 dot products (``kernels/csrc/dpbf16_gemm.c``), for CPUs that compute bf16 in
    hardware without AMX."""

    kernel, dtype = "dpbf16", torch.bfloat16


class Fma32(Packed):
    """fp32 on AVX-512 FMA (``kernels/csrc/fma32_gemm.c``): on a Zen 4 EPYC, where MKL's sgemm runs its
    generic path and copies the weight on every call."""

    kernel, dtype = "fma32", torch.float32


class Int8:
    """``x @ weight.T`` approximated with int8 weights (one scale per output) and int8 rows (one scale
    per row) on AVX512-VNNI (``kernels/csrc/int8_gemm.c``), fp32 sums. Not a backend of ``linear``: its
    results are not the model's. The native forward multiplies speculative drafts' rows with it where
    ``int8_drafts`` is on (models/native_forward.py): a draft only proposes tokens that the verify pass,
    in the model's own dtype, accepts or rejects."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.n, self.k = weight.shape
        if not native.int8_fits(self.n, self.k):
            raise ValueError(f"the int8 kernel takes no weight of shape {tuple(weight.shape)} here")
        lib = native.library()
        self.packed = torch.empty(lib.int8_packed_bytes(self.n, self.k), dtype=torch.int8)
        values = weight.detach().float().contiguous()  # held: a temporary would be freed before the call
        lib.int8_pack(values.data_ptr(), self.n, self.k, self.packed.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 sums of ``x`` [rows, k] (fp32 or bf16) against the weight."""
        if x.dtype not in native.DTYPES or x.shape[-1] != self.k:
            got = f"{x.dtype} rows of {x.shape[-1]}"
            raise TypeError(f"the int8 product takes fp32 or bf16 rows of {self.k}, not {got}")
        x, lib = x.contiguous(), native.library()
        out = torch.empty((x.shape[0], self.n), dtype=torch.float32)
        work = torch.empty(lib.int8_work_bytes(x.shape[0], self.k), dtype=torch.uint8)
        lib.int8_gemm(x.data_ptr(), native.DTYPES[x.dtype], x.shape[0], self.packed.data_ptr(), self.n, self.k,
                      out.data_ptr(), torch.get_num_threads(), work.data_ptr())  # fmt: skip
        return out


def packed_kernel(n: int, k: int) -> str | None:
    """The first of triserve's own bf16 kernels (``Packed``; AMX before AVX512-BF16) that takes a
    [n, k] weight on this CPU, or None."""
    return next((name for name in ("amx", "dpbf16") if getattr(native, f"{name}_fits")(n, k)), None)


def _packed(weight: torch.Tensor) -> Product:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROW_MULTIPLE)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


BACKENDS: dict[str, Callable[[torch.Tensor], Product]] = {
    "blas": Blas, "packed": _packed, "mkl_bf16": MklBf16, "amx": Amx, "dpbf16": Dpbf16, "fma32": Fma32
}  # fmt: skip


def backends_for(weight: torch.Tensor) -> list[str]:
    """The fast path's backends for ``weight``, preferred first (none: the padded reference)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return []
    if weight.dtype == torch.float32:
        return ["fma32", "blas", "packed"] if native.fma32_fits(*weight.shape) else ["blas", "packed"]
    if weight.dtype != torch.bfloat16 or not cpu_has_fast_half():
        return []
    own = packed_kernel(*weight.shape)
    return [own, "packed"] if own else ["packed"]


@functools.cache
def probe_rows(backend: str, out_features: int, in_features: int, dtype: torch.dtype, threads: int) -> tuple[int, int]:
    """(min_rows, max_rows) of ``backend``'s products of this shape and dtype on this CPU with this thread
    count: the fewest rows from which every call of up to 8 rows rounds each row as calls of 8 do (smaller
    calls are padded to it), and the largest of 8, 16, 32 and 64 up to which every call of ``min_rows`` or
    more rows does (larger calls are split; 0: no call agrees, the backend is not used). Backends choose
    kernels by shape, not values, so one probe serves every weight of the shape. A kernel that rounds
    otherwise shows up as differing bits, but rarely (about one output in ten thousand for the bf16
    products above), so several batches of random rows are compared."""
    weight = (torch.randn((out_features, in_features), generator=torch.Generator().manual_seed(99))).to(dtype)
    try:
        product = BACKENDS[backend](weight)
    except ValueError:  # a backend that does not take this shape or dtype here
        return 0, 0
    product = getattr(product, "sums", product)  # unrounded where the backend gives them
    gen = torch.Generator().manual_seed(1234)  # not the weight's stream: rows equal to weight rows hide differences
    agrees = set(range(1, PROBE_ROWS + 1))
    for _ in range(PROBE_BATCHES):
        probe = torch.randn((PROBE_ROWS, in_features), generator=gen).to(dtype)
        reference = torch.cat([product(probe[i : i + 8]) for i in range(0, PROBE_ROWS, 8)])
        agrees -= {n for n in agrees if not torch.equal(product(probe[:n]), reference[:n])}
    min_rows = min((m for m in range(1, 9) if agrees >= set(range(m, 9))), default=0)
    if not min_rows:
        return 0, 0
    ok = [limit for limit in (8, 16, 32, PROBE_ROWS) if agrees >= set(range(min_rows, limit + 1))]
    return min_rows, max(ok)  # 8 at least: min_rows is chosen so that every call of min_rows..8 agrees


class Prepared:
    """A fused weight, the backend chosen for it (``product``, None: the padded reference), the
    fingerprint of the parameters it came from and the thread count it was chosen for."""

    def __init__(self, weights: tuple[torch.Tensor, ...], backends: tuple[str, ...] | None = None) -> None:
        self.fingerprint = fingerprint(weights)
        self.threads = torch.get_num_threads()  # the probes hold for this many threads
        fused = fuse(weights)
        self.weight = fused.detach()
        self.backend: str | None = None
        self.product: Product | None = None
        self.min_rows, self.max_rows = ROW_MULTIPLE, PROBE_ROWS
        for backend in backends_for(self.weight) if backends is None else backends:
            min_rows, max_rows = probe_rows(backend, *fused.shape, fused.dtype, torch.get_num_threads())
            if max_rows:
                self.backend, self.product = backend, BACKENDS[backend](self.weight)
                self.min_rows, self.max_rows = min_rows, max_rows
                break

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n >= self.min_rows:
            return self.product(x.contiguous())
        return self.product(pad_rows(x, self.min_rows))[:n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.product is None:
            return kernels.linear(x, self.weight)
        if x.shape[0] <= self.max_rows:
            return self._call(x)
        return torch.cat([self._call(piece) for piece in x.split(self.max_rows)])


def fuse(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Weights that read the same input as one [sum of outputs, inputs] weight (one alone: itself)."""
    return weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])


def fingerprint(weights: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    """Where the parameters live and how often they were written in place. Parameters created under
    ``torch.inference_mode()`` keep no write counter: their address alone identifies them (a reload
    is noticed, an in-place write to them is not). (Checked before every native forward: two maps over
    the tensors cost about a third of a loop over them.)"""
    addresses = tuple(map(torch.Tensor.data_ptr, weights))
    try:
        return addresses + tuple(map(_VERSION, weights))
    except RuntimeError:  # an inference tensor among them
        return addresses + tuple(0 if w.is_inference() else w._version for w in weights)


_VERSION = operator.attrgetter("_version")


def prepared(weights: tuple[torch.Tensor, ...], backends: tuple[str, ...] | None = None) -> Prepared:
    """The fast path's product for ``weights`` fused: the first of ``backends`` (default: ``backends_for``'s)
    that probes invariant."""
    # kept on the first weight itself, so it lives and dies with the parameter; prepared again when the
    # parameters or the thread count changed (a model warmed up at load, then run with more threads)
    name = "_triserve_prepared" if backends is None else "_triserve_prepared_" + "_".join(backends)
    entry = getattr(weights[0], name, None)
    if entry is None or entry.fingerprint != fingerprint(weights) or entry.threads != torch.get_num_threads():
        entry = Prepared(weights, backends)
        setattr(weights[0], name, entry)
    return entry


def fast_path_on() -> bool:
    """Whether products take the fast path now: it is on and nothing is being differentiated."""
    return FAST_PATH and not torch.is_grad_enabled()


def linear(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """``x @ cat(weights).T`` (one weight, or several that read the same input, fused), with the
    same rounding for a row whether it comes alone or in a batch."""
    if fast_path_on():
        return prepared(weights)(x)
    if len(weights) == 1:
        return kernels.linear(x, weights[0])
    return torch.cat([kernels.linear(x, w) for w in weights], dim=-1)

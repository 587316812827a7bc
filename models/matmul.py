"""Matrix products of the forward: a row's result never depends on how many rows share the call.

That invariance is what keeps self-speculation lossless (a verify row must round exactly like the
AR step it replaces) and lets a request compute the same thing alone or in any batch. Products go
through ``kernels.linear`` (MKL on padded rows on CPU, a fixed-tiling Triton kernel on CUDA; see
kernels/matmul.py), except on the CPU fast path:

- **oneDNN with a pre-packed weight** (on CPU, inference; fp32, and bf16 where the CPU computes it
  in hardware). oneDNN picks kernels by row count, and some round differently: on an AMX Xeon, bf16
  products reducing over 768 or more inputs give other bits in calls of more than 32 rows (some
  sizes only, and where the switch happens depends on the thread count); below 4 rows other CPUs
  may take other kernels (this project's do not, and a lone AR row unpadded costs about 0.8x of
  four padded rows). So each shape, dtype and thread count is probed once, when a weight of it is
  first packed, on batches of 64 rows against the same rows computed in calls of 8: calls are
  padded to 4 rows unless rows 1 to 7 agree alone, and split into pieces of at most ``max_rows``
  rows (8, 16, 32 or 64: the largest up to which every call agreed; larger calls are never trusted
  unprobed). Packing once also skips the
  per-call weight packing MKL does: a forward's
  products ran 1.6x faster at 4 rows and 1.25x at 32 than ``F.linear`` on the same rows. It costs
  a second copy of the weights in memory. On the AMX Xeon packed bf16 products take 0.5-0.9x the
  time of packed fp32 ones at 1 row and 0.3x at 164 rows (the bundled model's shapes, one thread).

The fast path also fuses projections that read the same input (q/k/v, gate/up) into one call.
Fused and packed weights are derived from the model's own parameters (the checkpoint format is
unchanged) and rebuilt when a parameter changes (a training step, a reload).
``TRISERVE_FAST_PATH=0`` turns packing and fusion off; training (gradients on) never uses them.
"""

from __future__ import annotations

import functools
import os

import torch

import kernels
from kernels.matmul import PIECE_ROWS, ROW_MULTIPLE, pad_rows

FAST_PATH = os.environ.get("TRISERVE_FAST_PATH", "1").strip() != "0"
PROBE_ROWS = PIECE_ROWS  # row counts probed per shape, as the padded reference's pieces; larger calls are split
PROBE_BATCHES = 4


def _can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_has_fast_half())


def cpu_has_fast_half() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX); without it a bf16 forward
    converts every operand and costs about twice an fp32 one."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def probe_rows(out_features: int, in_features: int, dtype: torch.dtype, threads: int) -> tuple[int, int]:
    """(min_rows, max_rows) of packed products of this shape and dtype on this CPU with this thread count:
    whether calls of 1..7 rows round every row as calls of 8 do (else such calls are padded to 4), and
    the largest of 8, 16, 32 and 64 up to which every call of ``min_rows`` or more rows does (larger
    calls are split). oneDNN chooses kernels by shape, not values, so one probe serves every weight of
    the shape. A kernel that rounds otherwise shows up as differing bits, but rarely (about one output
    in ten thousand for the bf16 products above), so several batches of random rows are compared."""
    weight = (torch.randn((out_features, in_features), generator=torch.Generator().manual_seed(99))).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROW_MULTIPLE)

    def product(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    gen = torch.Generator().manual_seed(1234)  # not the weight's stream: rows equal to weight rows hide differences
    agrees = set(range(1, PROBE_ROWS + 1))
    for _ in range(PROBE_BATCHES):
        probe = torch.randn((PROBE_ROWS, in_features), generator=gen).to(dtype)
        reference = torch.cat([product(probe[i : i + 8]) for i in range(0, PROBE_ROWS, 8)])
        agrees -= {n for n in agrees if not torch.equal(product(probe[:n]), reference[:n])}
    min_rows = 1 if agrees >= set(range(1, 8)) else ROW_MULTIPLE
    ok = [limit for limit in (8, 16, 32, PROBE_ROWS) if agrees >= set(range(min_rows, limit + 1))]
    return min_rows, max(ok, default=0)


class _Prepared:
    """A fused weight (and its oneDNN packing) plus the fingerprint of the parameters it came from."""

    def __init__(self, weights: tuple[torch.Tensor, ...]) -> None:
        self.fingerprint = _fingerprint(weights)
        fused = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        self.weight = fused.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, ROW_MULTIPLE) if _can_pack(fused) else None
        if self.packed is not None:
            self.min_rows, self.max_rows = probe_rows(*fused.shape, fused.dtype, torch.get_num_threads())
        else:
            self.min_rows, self.max_rows = ROW_MULTIPLE, PROBE_ROWS
        if not self.max_rows:  # a backend that rounds calls of 4..7 rows otherwise: the padded reference instead
            self.packed = None

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n >= self.min_rows:
            return self._product(x)
        return self._product(pad_rows(x))[:n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return kernels.linear(x, self.weight)
        if x.shape[0] <= self.max_rows:
            return self._call(x)
        return torch.cat([self._call(piece) for piece in x.split(self.max_rows)])


def _fingerprint(weights: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    """Where the parameters live and how often they were written in place. Parameters created under
    ``torch.inference_mode()`` keep no write counter: their address alone identifies them (a reload
    is noticed, an in-place write to them is not)."""
    return tuple(v for w in weights for v in (w.data_ptr(), 0 if w.is_inference() else w._version))


def _prepared(weights: tuple[torch.Tensor, ...]) -> _Prepared:
    # kept on the first weight itself, so it lives and dies with the parameter
    entry = getattr(weights[0], "_triserve_prepared", None)
    if entry is None or entry.fingerprint != _fingerprint(weights):
        entry = _Prepared(weights)
        weights[0]._triserve_prepared = entry
    return entry


def linear(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """``x @ cat(weights).T`` (one weight, or several that read the same input, fused), with the
    same rounding for a row whether it comes alone or in a batch."""
    if FAST_PATH and not torch.is_grad_enabled():
        return _prepared(weights)(x)
    if len(weights) == 1:
        return kernels.linear(x, weights[0])
    return torch.cat([kernels.linear(x, w) for w in weights], dim=-1)

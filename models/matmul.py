"""Matrix products of the forward: a row's result never depends on how many rows share the call.

That invariance is what keeps self-speculation lossless (a verify row must round exactly like the
AR step it replaces) and lets a request compute the same thing alone or in any batch. Products go
through ``kernels.linear`` (MKL on padded rows on CPU, a fixed-tiling Triton kernel on CUDA; see
kernels/matmul.py), except on the CPU fast path:

- **oneDNN with a pre-packed weight** (on CPU, inference; fp32, and bf16 where the CPU computes it
  in hardware): every row count from 4 up gives bit-identical rows, with one thread or two
  (measured on this project's AVX2 machines in fp32 and on an AMX Xeon in both dtypes, checked by
  tests/test_fast_path.py). Below 4 rows oneDNN may take other kernels on other CPUs; on this
  project's machines it does not, and a lone AR row unpadded costs about 0.8x of four padded rows.
  So each packed weight is probed once, when it is packed: if rows 1 to 7 of a probe come out
  bit-identical alone and in one call of 8, calls are never padded; otherwise calls of fewer
  than 4 rows are. Packing once also skips the per-call weight packing MKL does: a forward's
  products ran 1.6x faster at 4 rows and 1.25x at 32 than ``F.linear`` on the same rows. It costs
  a second copy of the weights in memory. On the AMX Xeon packed bf16 products take 0.5-0.9x the
  time of packed fp32 ones at 1 row and 0.3x at 164 rows (the bundled model's shapes, one thread).

The fast path also fuses projections that read the same input (q/k/v, gate/up) into one call.
Fused and packed weights are derived from the model's own parameters (the checkpoint format is
unchanged) and rebuilt when a parameter changes (a training step, a reload).
``TRISERVE_FAST_PATH=0`` turns packing and fusion off; training (gradients on) never uses them.
"""

from __future__ import annotations

import os

import torch

import kernels
from kernels.matmul import ROW_MULTIPLE, pad_rows

FAST_PATH = os.environ.get("TRISERVE_FAST_PATH", "1").strip() != "0"


def _can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_has_fast_half())


def cpu_has_fast_half() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX); without it a bf16 forward
    converts every operand and costs about twice an fp32 one."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _Prepared:
    """A fused weight (and its oneDNN packing) plus the fingerprint of the parameters it came from."""

    def __init__(self, weights: tuple[torch.Tensor, ...]) -> None:
        self.fingerprint = _fingerprint(weights)
        fused = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        self.weight = fused.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, ROW_MULTIPLE) if _can_pack(fused) else None
        self.min_rows = 1 if self.packed is not None and self._small_calls_agree() else ROW_MULTIPLE

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")

    def _small_calls_agree(self) -> bool:
        """Whether calls of 1..7 rows round every row exactly as one call of 8 does (this CPU, this
        thread count): a different kernel for small calls shows up as a differing bit."""
        probe = torch.randn((8, self.weight.shape[1]), generator=torch.Generator().manual_seed(0)).to(self.weight.dtype)
        full = self._product(probe)
        return all(torch.equal(self._product(probe[:n]), full[:n]) for n in range(1, 8))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return kernels.linear(x, self.weight)
        n = x.shape[0]
        if n >= self.min_rows:
            return self._product(x)
        return self._product(pad_rows(x))[:n]


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

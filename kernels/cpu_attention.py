"""Segment attention on the CPU in one native call per layer (``csrc/segment_attention.c``).

The PyTorch reference (kernels/segment_attention.py) keeps a row's result independent of the call's
shape with some 25 tensor operations a layer, so one AR row's attention cost about 100-170 us a layer,
far more than its arithmetic. The C kernel computes row by row and gets the invariance by
construction (the comment atop the C file says how), its (segment, KV head) pairs shared out among
torch's thread count. It agrees with the reference to float rounding, not bit for bit; the fast path
takes it for every CPU forward, the reference serves with the fast path off, so the two never mix
within one process's serving.
"""

from __future__ import annotations

import torch

from kernels import native
from kernels.masks import MaskKind
from kernels.segment_attention import AttentionMetadata


def takes_heads(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the native kernel takes these heads: a width its vectors divide, no more than 64 query
    heads per KV head."""
    return head_dim % native.LANES == 0 and heads <= 64 * kv_heads


def supports(q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the native kernel can take this call: CPU tensors of one supported dtype, heads it takes
    (``takes_heads``), contiguous caches."""
    return (
        takes_heads(q.shape[1], k.shape[1], q.shape[-1])
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and native.serves(q, k, k_cache, v_cache)
    )


def segments_and_slots(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment table and prefix slots as the C kernel reads them (int64, contiguous); kept per step
    under the key "native" (``meta.derived``), which the native forward shares."""
    rows = [(s.q_start, s.q_len, s.prefix_len, int(s.kind is MaskKind.CAUSAL)) for s in meta.segments]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1), native.int64(meta.prefix_slots)


def segment_attention_native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor | None:
    """``segment_attention_reference``'s contract (q [T, Hq, D]; k, v [T, Hkv, D]; caches [slots, Hkv,
    D] -> [T, Hq, D] in q's dtype, fp32 arithmetic; rows no segment covers are left unset), computed
    by the native kernel; None (the caller then takes the reference) where ``supports`` does not hold."""
    if not supports(q, k, k_cache, v_cache):
        return None
    t, hq, d = q.shape
    out = torch.empty((t, hq, d), dtype=q.dtype)
    segments, table = meta.derived("native", lambda: segments_and_slots(meta))
    rows = native.row_stride
    status = native.library().segment_attention(
        q.data_ptr(), rows(q), k.data_ptr(), rows(k), v.data_ptr(), rows(v), k_cache.data_ptr(),
        v_cache.data_ptr(), out.data_ptr(), hq, k.shape[1], d, len(meta.segments), segments.data_ptr(),
        table.data_ptr(), table.shape[1], scale, native.DTYPES[q.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:  # -1: no memory for the scratch keys; -2: a shape ``supports`` turns away
        raise RuntimeError(f"native attention failed with status {status}")
    return out

"""Triton segment attention vs ``segment_attention_reference``, on CPU through the Triton interpreter.

The kernel merges fixed key blocks with a running log-sum-exp, slice by slice, the reference normalises
by each row's global maximum: fp32 agrees to ~1e-6, bf16 outputs to one rounding step. The cases here
hold fewer keys than a slice, so the tests marked ``sliced`` run again with one key block a slice.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import kernels.triton_segment_attention as triton_attention  # noqa: E402
from kernels.masks import MaskKind  # noqa: E402
from kernels.segment_attention import (  # noqa: E402
    KEY_BLOCK,
    AttentionMetadata,
    AttentionSegment,
    segment_attention_reference,
)
from kernels.triton_segment_attention import segment_attention_triton  # noqa: E402
from tests.attention_cases import attention_case  # noqa: E402

SLOTS = 300
# (kind, prefix length, segment length): a prefill crossing a key block and several tiles, a verify
# block over a prefix crossing a key block, a draft, a quadratic cycle's draft branches (5 mask
# slots: split over tiles when 8 heads share a KV head), an AR step
LAYOUT = [
    (MaskKind.CAUSAL, 0, 67),
    (MaskKind.CAUSAL, 70, 5),
    (MaskKind.BIDIRECTIONAL, 10, 7),
    (MaskKind.BIDIRECTIONAL, 66, 5),
    (MaskKind.BIDIRECTIONAL, 3, 5),
    (MaskKind.CAUSAL, 5, 1),
]


def _case(hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    return attention_case(LAYOUT, SLOTS, hq, hkv, d, dtype, seed)


@pytest.fixture(params=["one slice", "one key block a slice"])
def sliced(request, monkeypatch):
    if request.param != "one slice":
        monkeypatch.setattr(triton_attention, "SPLIT_KEYS", KEY_BLOCK)


@pytest.mark.parametrize(("hq", "hkv", "d"), [(6, 2, 16), (4, 4, 24), (8, 1, 16)])
def test_fp32_matches_reference(hq: int, hkv: int, d: int, sliced) -> None:
    args = _case(hq, hkv, d, torch.float32)
    torch.testing.assert_close(
        segment_attention_triton(*args), segment_attention_reference(*args), rtol=1e-5, atol=1e-5
    )


def test_prefill_without_cache() -> None:
    q, k, v, k_cache, v_cache, _, scale = _case(4, 2, 16, torch.float32, seed=4)
    args = (
        q[:40],
        k[:40],
        v[:40],
        k_cache,
        v_cache,
        AttentionMetadata.from_slots([(0, 40, torch.arange(0), MaskKind.CAUSAL)]),
        scale,
    )
    torch.testing.assert_close(
        segment_attention_triton(*args), segment_attention_reference(*args), rtol=1e-5, atol=1e-5
    )


def test_bf16_matches_reference(sliced) -> None:
    args = _case(4, 2, 16, torch.bfloat16, seed=1)
    got = segment_attention_triton(*args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, segment_attention_reference(*args), rtol=1e-2, atol=1e-2)


def test_verify_rows_equal_ar_steps(sliced) -> None:
    """Self-speculation is lossless only if verify token d_j computes what the AR step at j computes:
    here the AR steps see the same keys, d_0..d_{j-1} now read from the cache. Bitwise, so the products
    avoid ``tl.dot`` (BLAS under the interpreter rounds a row by its place in the tile)."""
    q, k, v, k_cache, v_cache, _, scale = _case(6, 2, 16, torch.float32, seed=2)
    prefix = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(3))
    p = 61  # the verify tokens cross the first key block boundary
    q_len = 5
    segment = AttentionMetadata.from_slots([(0, q_len, prefix[:p], MaskKind.CAUSAL)])
    out = segment_attention_triton(q[:q_len], k[:q_len], v[:q_len], k_cache, v_cache, segment, scale, use_dot=False)
    verify_rows = list(range(q_len))
    k_cache[prefix[p : p + len(verify_rows)]] = k[verify_rows]  # where accepted tokens are written
    v_cache[prefix[p : p + len(verify_rows)]] = v[verify_rows]
    for j, row in enumerate(verify_rows):
        step = AttentionMetadata.from_slots([(0, 1, prefix[: p + j], MaskKind.CAUSAL)])
        one = slice(row, row + 1)
        ar = segment_attention_triton(q[one], k[one], v[one], k_cache, v_cache, step, scale, use_dot=False)
        assert torch.equal(ar[0], out[row])


@pytest.mark.parametrize("group", [1, 4, 8])
def test_graph_metadata_tiles_are_the_packed_steps(group: int) -> None:
    """What a CUDA graph builds on the device from its inputs (tile_layout + graph_metadata) is what
    _tiles builds on the host from the same segments: requests that each pack a verify of 37 rows (over
    several tiles), a draft and an AR step, at their own positions."""
    segments = [(37, MaskKind.CAUSAL), (5, MaskKind.BIDIRECTIONAL), (1, MaskKind.CAUSAL)]
    starts = torch.tensor([[12, 50, 49], [3, 40, 41]])
    width = 64
    prefix_slots = torch.arange(starts.numel() * width).reshape(-1, width)
    entries, q_start = [], 0
    for request_starts in starts.tolist():
        for (rows, kind), start in zip(segments, request_starts):
            entries.append((q_start, rows, start, kind))
            q_start += rows
    packed = AttentionMetadata([AttentionSegment(q, n, start, kind) for q, n, start, kind in entries], prefix_slots)
    expected, _, _ = triton_attention._tiles(packed, group)
    layout = triton_attention.tile_layout(segments, len(starts), width, group, torch.device("cpu"))
    meta = triton_attention.graph_metadata(layout, starts.reshape(-1), prefix_slots, group)
    tiles, slots, most_keys = meta.derived(("triton", group), lambda: None)
    assert torch.equal(tiles, expected) and torch.equal(slots, prefix_slots.reshape(-1))
    assert most_keys == width + 37

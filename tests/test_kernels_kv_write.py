"""KV-write Triton kernel vs its PyTorch reference, on CPU through the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.kv_write import kv_write_reference, kv_write_triton  # noqa: E402
from models.engine import KVCacheManager  # noqa: E402
from models.kv_cache import PagedKVCache  # noqa: E402


def _case(dtype: torch.dtype, rows: int, kv_heads: int, head_dim: int, written: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(1, kv_heads, head_dim, num_pages=8, page_size=4, dtype=dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen).to(dtype))
    k = torch.randn(rows, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(rows, kv_heads, head_dim, generator=gen).to(dtype)
    # a ragged step: two sequences with pages scattered over the pool
    kv = KVCacheManager(8, 4)
    kv.add(0)
    kv.add(1)
    kv.reserve(0, 7)
    kv.reserve(1, 9)
    slots = torch.cat([kv.slots(0, [3, 4, 5, 6]), kv.slots(1, range(9))])[: len(written)]
    return cache, k, v, torch.tensor(written), slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads,head_dim", [(2, 8), (1, 24), (3, 16)])
def test_matches_reference_bit_for_bit(dtype: torch.dtype, kv_heads: int, head_dim: int) -> None:
    written = [0, 2, 3, 5, 6, 7, 8, 9, 10, 12, 13]  # rows 1, 4, 11 belong to a read-only segment
    cache, k, v, rows, slots = _case(dtype, 14, kv_heads, head_dim, written)
    original = cache.k[0].clone()
    expected_k, expected_v = cache.k[0].clone(), cache.v[0].clone()
    kv_write_reference(expected_k, expected_v, k, v, rows, slots)
    kv_write_triton(cache.k[0], cache.v[0], k, v, rows, slots)
    # bitwise: the kernel copies raw bits, so even bf16 (broken arithmetic in the interpreter) is exact
    assert torch.equal(cache.k[0].view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(cache.v[0].view(torch.uint8), expected_v.view(torch.uint8))
    kept = torch.ones(original.shape[0], dtype=torch.bool)
    kept[slots] = False
    assert torch.equal(cache.k[0][slots], k[rows])  # the written slots hold the rows' keys ...
    assert torch.equal(cache.k[0][kept], original[kept])  # ... and every other slot kept its own


def test_strided_rows_from_a_fused_projection() -> None:
    cache, _, _, rows, slots = _case(torch.float32, 6, 2, 8, [0, 1, 4, 5])
    fused = torch.randn(6, 3, 2, 8)  # e.g. [T, (q|k|v), Hkv, D]: k and v are strided views
    k, v = fused[:, 1], fused[:, 2]
    kv_write_triton(cache.k[0], cache.v[0], k, v, rows, slots)
    assert torch.equal(cache.k[0][slots], k[rows]) and torch.equal(cache.v[0][slots], v[rows])


def test_nothing_written_and_bad_inputs() -> None:
    cache, k, v, _, _ = _case(torch.float32, 4, 2, 8, [])
    before = cache.k.clone()
    none = torch.tensor([], dtype=torch.long)
    kv_write_triton(cache.k[0], cache.v[0], k, v, none, none)
    assert torch.equal(cache.k, before)
    with pytest.raises(TypeError, match="must match the cache"):
        kv_write_triton(cache.k[0], cache.v[0], k.half(), v.half(), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="do not fit cache slots"):
        kv_write_triton(cache.k[0], cache.v[0], k[:, :1], v[:, :1], torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="2 rows for 1 slots"):
        kv_write_triton(cache.k[0], cache.v[0], k, v, torch.tensor([0, 1]), torch.tensor([0]))

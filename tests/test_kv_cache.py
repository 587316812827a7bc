"""Paged KV cache: bounded pool, page tables, rollback and free."""

from __future__ import annotations

import pytest
import torch

from models.kv_cache import CacheFullError, PagedKVCache


def make(pages=6, page_size=4):
    return PagedKVCache(num_layers=2, num_kv_heads=1, head_dim=2, num_pages=pages, page_size=page_size)


def test_reserve_write_read_rollback_free():
    cache = make()
    cache.add(7)
    cache.reserve(7, 10)  # 3 pages of 4
    assert cache.used_pages == 3 and cache.free_pages == 3
    slots = cache.slots(7, range(10))
    values = torch.arange(10, dtype=torch.float32)[:, None, None].expand(10, 1, 2)
    cache.k[0].index_copy_(0, slots, values)
    cache.set_length(7, 10)
    assert torch.equal(cache.k[0][cache.slots(7, range(10))], values)
    cache.set_length(7, 5)  # roll back: the third page returns to the pool
    assert cache.length(7) == 5 and cache.used_pages == 2
    with pytest.raises(IndexError):
        cache.slots(7, [9])
    cache.free(7)
    assert cache.used_pages == 0 and 7 not in cache


def test_pool_is_bounded_and_all_or_nothing():
    cache = make(pages=3)
    cache.add(1)
    cache.add(2)
    cache.reserve(1, 8)
    with pytest.raises(CacheFullError):
        cache.reserve(2, 8)
    assert cache.used_pages == 2  # the failed reservation took nothing
    cache.reserve(2, 4)
    assert cache.free_pages == 0


def test_sequences_do_not_share_pages():
    cache = make()
    for seq in (1, 2):
        cache.add(seq)
        cache.reserve(seq, 6)
    a, b = set(cache.page_table(1)), set(cache.page_table(2))
    assert not a & b
    with pytest.raises(KeyError):
        cache.add(1)

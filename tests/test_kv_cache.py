"""KV pages: a bounded pool, on-demand reservation, rollback, the device block table, prefix sharing, LRU eviction."""

from __future__ import annotations

import pytest
import torch

from models.engine.kv_manager import CacheFullError, KVCacheManager, chain_digests
from models.kv_cache import PagedKVCache


def make(pages=6, page_size=4, **kwargs):
    return KVCacheManager(pages, page_size, max_seqs=4, **kwargs)


def test_reserve_write_read_rollback_free():
    cache = PagedKVCache(num_layers=2, num_kv_heads=1, head_dim=2, num_pages=6, page_size=4)
    kv = make()
    kv.add(7)
    kv.reserve(7, 10)  # 3 pages of 4
    assert kv.used_pages == 3 and kv.free_pages == 3
    slots = kv.slots(7, range(10))
    values = torch.arange(10, dtype=torch.float32)[:, None, None].expand(10, 1, 2)
    k_layer, v_layer = cache.layers[1]  # the forward's per-layer arrays are views of the stacked ones
    k_layer.index_copy_(0, slots, values)
    v_layer.index_copy_(0, slots, -values)
    kv.set_length(7, 10)
    assert torch.equal(cache.k[1][kv.slots(7, range(10))], values)
    assert torch.equal(cache.v[1][kv.slots(7, range(10))], -values) and not cache.k[0].any()
    kv.set_length(7, 5)  # roll back: the pages stay with the sequence for its next verify
    assert kv.length(7) == 5 and kv.used_pages == 3
    with pytest.raises(IndexError):
        kv.slots(7, [12])
    kv.free(7)
    assert kv.used_pages == 0 and 7 not in kv


def test_pool_is_bounded_and_all_or_nothing():
    kv = make(pages=3)
    kv.add(1)
    kv.add(2)
    kv.reserve(1, 8)
    with pytest.raises(CacheFullError):
        kv.reserve(2, 8)
    assert kv.used_pages == 2  # the failed reservation took nothing
    kv.reserve(2, 4)
    assert kv.free_pages == 0
    with pytest.raises(ValueError):
        kv.set_length(2, 5)  # past its reserved pages


def test_sequences_do_not_share_pages_and_the_block_table_follows():
    kv = make()
    for seq in (1, 2):
        kv.add(seq)
        kv.reserve(seq, 6)
    a, b = kv.page_table(1), kv.page_table(2)
    assert not set(a) & set(b)
    table = kv.block_table
    assert table[kv.row(1), :2].tolist() == a and table[kv.row(2), :2].tolist() == b
    kv.reserve(1, 9)  # grows on demand: one more page, written into the same row
    assert kv.block_table[kv.row(1), :3].tolist() == kv.page_table(1)
    with pytest.raises(KeyError):
        kv.add(1)


def test_prefix_pages_are_shared_and_survive_their_sequence():
    kv = make(pages=6)
    digests = chain_digests(b"", [([1, 2, 3, 4], b""), ([5, 6, 7, 8], b"")])
    kv.add(1)
    kv.reserve(1, 10)
    kv.set_length(1, 10)
    kv.cache_pages(1, digests)  # two full pages of committed tokens
    first_two = kv.page_table(1)[:2]
    kv.add(2)
    assert kv.match_prefix(2, digests) == 2 and kv.page_table(2) == first_two
    assert kv.used_pages == 3  # shared, not copied
    kv.free(1)
    kv.free(2)
    assert kv.used_pages == 0  # free, but still cached
    kv.add(3)
    assert kv.match_prefix(3, digests) == 2 and kv.page_table(3) == first_two
    other = chain_digests(b"", [([1, 2, 3, 9], b"")])
    kv.add(4)
    assert kv.match_prefix(4, other) == 0  # one token differs: a different page


def test_digests_chain_and_carry_extra_bytes():
    a = chain_digests(b"", [([1, 2], b""), ([3, 4], b"")])
    b = chain_digests(b"", [([9, 2], b""), ([3, 4], b"")])
    c = chain_digests(b"", [([1, 2], b"image"), ([3, 4], b"")])
    assert a[1] != b[1] and a[1] != c[1] and a[0] != c[0]  # a page's digest depends on all before it


def test_eviction_takes_uncached_pages_first_then_least_recently_used():
    kv = make(pages=4)
    old = chain_digests(b"", [([1, 1, 1, 1], b"")])
    new = chain_digests(b"", [([2, 2, 2, 2], b"")])
    for seq, digests in ((1, old), (2, new)):
        kv.add(seq)
        kv.reserve(seq, 4)
        kv.set_length(seq, 4)
        kv.cache_pages(seq, digests)
        kv.free(seq)
    kv.add(3)
    kv.reserve(3, 8)  # two pages: the two that never held a cached prefix
    assert kv.free_pages == 2
    kv.add(4)
    assert kv.match_prefix(4, old) == 1  # a hit makes "old" the most recently used
    kv.free(4)
    kv.free(3)
    kv.add(5)
    kv.reserve(5, 12)  # needs three: the uncached two, then the least recently used cached page
    kv.add(6)
    assert kv.match_prefix(6, old) == 1  # used last: kept
    kv.add(7)
    assert kv.match_prefix(7, new) == 0  # evicted
    kv.free(5)
    kv.free(6)
    kv.add(8)
    assert kv.match_prefix(8, old) == 1


def test_prefix_caching_off_shares_nothing():
    kv = make(prefix_caching=False)
    digests = chain_digests(b"", [([1, 2, 3, 4], b"")])
    kv.add(1)
    kv.reserve(1, 4)
    kv.cache_pages(1, digests)
    kv.add(2)
    assert kv.match_prefix(2, digests) == 0

"""The compiled CPU attention (kernels/cpu_attention.py) against ``segment_attention_reference``, its
shape invariance (what keeps self-speculation exact on the fast path), and its fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

import models
from kernels import cpu_attention
from kernels.masks import MaskKind
from kernels.segment_attention import AttentionMetadata, segment_attention_reference
from models import matmul

pytestmark = pytest.mark.skipif(cpu_attention.library() is None, reason="no C compiler")

SLOTS = 400
# a prefill crossing several 16-key chunks, a verify block, a diffusion block, a quadratic cycle's
# branches, an AR step, and a segment that sees no cache
LAYOUT = [
    (MaskKind.CAUSAL, 0, 67),
    (MaskKind.CAUSAL, 70, 5),
    (MaskKind.BIDIRECTIONAL, 10, 32),
    (MaskKind.BIDIRECTIONAL, 66, 5),
    (MaskKind.CAUSAL, 130, 1),
    (MaskKind.BIDIRECTIONAL, 0, 3),
]


def _case(hq: int, hkv: int, d: int, dtype: torch.dtype, layout=LAYOUT, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(n for _, _, n in layout)
    q, k, v = (torch.randn(total, h, d, generator=gen).mul_(2).to(dtype) for h in (hq, hkv, hkv))
    k_cache, v_cache = (torch.randn(SLOTS, hkv, d, generator=gen).to(dtype) for _ in range(2))
    entries, start = [], 0
    for kind, prefix, n in layout:
        entries.append((start, n, torch.randperm(SLOTS, generator=gen)[:prefix], kind))  # paged: scattered
        start += n
    return q, k, v, k_cache, v_cache, AttentionMetadata.from_slots(entries), d**-0.5


@pytest.mark.parametrize(("hq", "hkv", "d"), [(8, 2, 32), (4, 4, 16), (8, 1, 64), (12, 2, 128)])
def test_fp32_matches_reference(hq: int, hkv: int, d: int) -> None:
    args = _case(hq, hkv, d, torch.float32)
    torch.testing.assert_close(
        cpu_attention.segment_attention_native(*args), segment_attention_reference(*args), rtol=1e-5, atol=2e-6
    )


def test_bf16_matches_reference_to_one_rounding() -> None:
    args = _case(8, 2, 32, torch.bfloat16, seed=3)
    native, reference = cpu_attention.segment_attention_native(*args), segment_attention_reference(*args)
    assert native.dtype == torch.bfloat16
    torch.testing.assert_close(native.float(), reference.float(), rtol=2 * 2**-8, atol=1e-3)


def test_a_row_is_the_same_alone_and_in_any_call() -> None:
    """Rows of a verify block, beside a diffusion block and an AR step of other requests, equal the
    AR steps that compute them alone (the prefix then grown by one cached key per step)."""
    gen = torch.Generator().manual_seed(7)
    hq, hkv, d, prefix, block = 8, 2, 32, 45, 8
    for dtype in (torch.float32, torch.bfloat16):
        k_cache, v_cache = (torch.randn(SLOTS, hkv, d, generator=gen).to(dtype) for _ in range(2))
        slots = torch.randperm(SLOTS, generator=gen)[: prefix + block]
        q = torch.randn(block + 40, hq, d, generator=gen).to(dtype)
        k, v = (torch.randn(block + 40, hkv, d, generator=gen).to(dtype) for _ in range(2))
        # the verify block's own keys are the ones its AR steps find cached
        k_cache[slots[prefix:]], v_cache[slots[prefix:]] = k[:block], v[:block]
        other = torch.randperm(SLOTS, generator=gen)
        meta = AttentionMetadata.from_slots(
            [
                (0, block, slots[:prefix], MaskKind.CAUSAL),
                (block, 32, other[:100], MaskKind.BIDIRECTIONAL),
                (block + 32, 8, other[100:300], MaskKind.CAUSAL),
            ]
        )
        together = cpu_attention.segment_attention_native(q, k, v, k_cache, v_cache, meta, d**-0.5)
        for i in range(block):
            step = AttentionMetadata.from_slots([(0, 1, slots[: prefix + i], MaskKind.CAUSAL)])
            alone = cpu_attention.segment_attention_native(q[i : i + 1], k[i : i + 1], v[i : i + 1], k_cache, v_cache,
                                                           step, d**-0.5)  # fmt: skip
            assert torch.equal(alone[0], together[i]), (dtype, i)
        # a diffusion block alone equals the same block beside the others
        block_meta = AttentionMetadata.from_slots([(0, 32, other[:100], MaskKind.BIDIRECTIONAL)])
        rows = slice(block, block + 32)
        alone = cpu_attention.segment_attention_native(q[rows], k[rows], v[rows], k_cache, v_cache, block_meta,
                                                       d**-0.5)  # fmt: skip
        assert torch.equal(alone, together[rows])


def test_calls_it_does_not_support_take_the_reference() -> None:
    q, k, v, k_cache, *_ = _case(4, 2, 24, torch.float32)
    assert not cpu_attention.supports(q, k, k_cache)  # heads 24 wide: not a multiple of its vectors
    q, k, v, k_cache, *_ = _case(4, 2, 32, torch.float16)
    assert not cpu_attention.supports(q, k, k_cache)
    q, k, v, k_cache, *_ = _case(4, 2, 32, torch.bfloat16)
    assert cpu_attention.supports(q, k, k_cache)


def test_without_a_compiler_the_reference_serves(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("TRISERVE_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_attention"):
        assert cpu_attention.load(str(tmp_path / "no-such-cc")) is None
    assert "the PyTorch reference serves" in caplog.text
    assert not list(tmp_path.rglob("*.so"))  # no half-built library is left for the next process


def test_the_fast_path_serves_attention_natively(monkeypatch) -> None:
    calls = []
    native = cpu_attention.segment_attention_native
    monkeypatch.setattr(cpu_attention, "segment_attention_native", lambda *a: calls.append(1) or native(*a))
    model = models.load_model("models/bundled/tiny-code", warm_up=False)
    monkeypatch.setattr(matmul, "FAST_PATH", False)
    models.generate(model, [1, 5, 9], max_new_tokens=2)
    assert not calls
    monkeypatch.setattr(matmul, "FAST_PATH", True)
    models.generate(model, [1, 5, 9], max_new_tokens=2)
    assert len(calls) == 2 * model.config.num_hidden_layers

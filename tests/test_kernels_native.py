"""The native CPU kernels (kernels/native.py) against their PyTorch references: segment attention and
its shape invariance (what keeps self-speculation exact on the fast path), RMSNorm, RoPE (bit for
bit), and the fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

import kernels
import models
from kernels import cpu_attention, native
from kernels.masks import MaskKind
from kernels.rmsnorm import _native_rows, native_is_reference, rmsnorm_native, rmsnorm_reference
from kernels.rope import rope_native, rope_reference
from kernels.segment_attention import AttentionMetadata, segment_attention_reference
from models import matmul, native_forward
from tests.attention_cases import attention_case

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler")

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


def _case(hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    return attention_case(LAYOUT, SLOTS, hq, hkv, d, dtype, seed)


@pytest.mark.parametrize(("hq", "hkv", "d"), [(8, 2, 32), (4, 4, 16), (8, 1, 64), (12, 2, 128)])
def test_fp32_matches_reference(hq: int, hkv: int, d: int) -> None:
    args = _case(hq, hkv, d, torch.float32)
    torch.testing.assert_close(
        cpu_attention.segment_attention_native(*args), segment_attention_reference(*args), rtol=1e-5, atol=2e-6
    )


@pytest.mark.parametrize(("hq", "hkv", "d"), [(8, 2, 32), (4, 4, 16), (8, 1, 64), (12, 2, 128)])
def test_bf16_matches_reference_to_one_rounding(hq: int, hkv: int, d: int) -> None:
    """bf16 scores take VDPBF16PS where the CPU has it (pairs of the head dimension, partial register
    tiles at these head counts): still the reference's result to about one bf16 rounding."""
    args = _case(hq, hkv, d, torch.bfloat16, seed=3)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_change_no_bit(dtype: torch.dtype) -> None:
    """The (segment, KV head) pairs shared out among threads give every row the bits one thread gives it,
    with more threads than pairs too (one segment, one KV head)."""
    args = _case(8, 2, 32, dtype, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = cpu_attention.segment_attention_native(*args)
        single_args = attention_case([(MaskKind.CAUSAL, 40, 9)], SLOTS, 8, 1, 32, dtype, seed=6)
        one_pair = cpu_attention.segment_attention_native(*single_args)
        for count in (2, 3):
            torch.set_num_threads(count)
            assert torch.equal(cpu_attention.segment_attention_native(*args), alone), count
            assert torch.equal(cpu_attention.segment_attention_native(*single_args), one_pair), count
    finally:
        torch.set_num_threads(threads)


def test_calls_it_does_not_support_take_the_reference() -> None:
    args = _case(4, 2, 24, torch.float32)
    assert cpu_attention.segment_attention_native(*args) is None  # heads 24 wide: not a multiple of its vectors
    args = _case(4, 2, 32, torch.float16)
    assert cpu_attention.segment_attention_native(*args) is None
    q, k, v, k_cache, v_cache, *_ = _case(4, 2, 32, torch.bfloat16)
    assert cpu_attention.supports(q, k, k_cache, v_cache)
    assert not cpu_attention.supports(q, k, k_cache, v_cache[:, :, :16])  # a cache that is not contiguous


def test_without_a_compiler_the_reference_serves(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("TRISERVE_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kernels.native"):
        assert native.load(str(tmp_path / "no-such-cc")) is None
    assert "the PyTorch references serve" in caplog.text
    assert not list(tmp_path.rglob("*.so"))  # no half-built library is left for the next process


def test_an_unwritable_cache_leaves_the_references_serving(tmp_path, monkeypatch, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TRISERVE_CACHE", str(blocker / "cache"))  # under a file: no folder can be made
    with caplog.at_level(logging.WARNING, logger="kernels.native"):
        assert native.load("cc") is None
    assert "the PyTorch references serve" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [256, 768])
def test_rmsnorm_serves_only_where_it_is_the_reference_bit_for_bit(dtype, width) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, width, generator=gen).mul_(3).to(dtype)
    weight = torch.randn(width, generator=gen).to(dtype)
    reference = rmsnorm_reference(x, weight, 1e-5)
    out = rmsnorm_native(x, weight, 1e-5)
    if native_is_reference(width, dtype, 1e-5):
        assert out is not None and torch.equal(out, reference)
    else:
        assert out is None  # the caller takes the reference
    # the kernel itself, probe or not: close to the reference, a row the same alone and in any call
    rows = _native_rows(x, weight, 1e-5)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2 * 2**-8, "atol": 1e-2}
    torch.testing.assert_close(rows.float(), reference.float(), **tolerance)
    for part in (slice(0, 1), slice(5, 6), slice(3, 35)):
        assert torch.equal(_native_rows(x[part], weight, 1e-5), rows[part])
    assert rmsnorm_native(x.half(), weight.half(), 1e-5) is None  # fp16: the reference's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_rope_is_the_reference_bit_for_bit(dtype, scaled) -> None:
    gen = torch.Generator().manual_seed(2)
    t, hq, hkv, d = 9, 8, 2, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).mul_(4).to(dtype)  # views of a fused projection
    q, k, _ = qkv.split_with_sizes([hq * d, hkv * d, hkv * d], -1)
    q, k = q.view(t, hq, d), k.view(t, hkv, d)
    angles = torch.rand(t, 1, d, generator=gen) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    scale = (1 + torch.rand(t, 1, 1, generator=gen)).to(dtype) if scaled else None
    for got, want in zip(rope_native(q, k, cos, sin, scale), rope_reference(q, k, cos, sin, scale)):
        assert got.shape == want.shape and torch.equal(got, want)


def test_the_fast_path_serves_the_native_kernels(monkeypatch) -> None:
    calls = []
    for module, name in ((kernels, "segment_attention_native"), (kernels, "rmsnorm_native"),
                         (kernels, "rope_native")):  # fmt: skip
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    model = models.load_model("models/bundled/tiny-code", warm_up=False)
    # the Python layers: where the native forward serves a model (fp32), it runs these kernels in its one call
    monkeypatch.setattr(native_forward, "decoder_for", lambda model: None)
    monkeypatch.setattr(matmul, "FAST_PATH", False)
    models.generate(model, [1, 5, 9], max_new_tokens=2)
    assert not calls
    monkeypatch.setattr(matmul, "FAST_PATH", True)
    models.generate(model, [1, 5, 9], max_new_tokens=2)
    layers = model.config.num_hidden_layers
    assert calls.count("segment_attention_native") == calls.count("rope_native") == 2 * layers
    assert calls.count("rmsnorm_native") == 2 * (2 * layers + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 100, 4096, 4099])
def test_native_row_argmax_is_torch_argmax(dtype: torch.dtype, vocab: int) -> None:
    """Ties to the lowest index (inside a vector, across vectors, in the tail), the first NaN, a row with
    nothing above -inf; rows read in place from a wider tensor."""
    from kernels.row_stats import row_argmax

    gen = torch.Generator().manual_seed(vocab)
    wide = torch.randn((9, vocab + 5), generator=gen).to(dtype)
    logits = wide[:, :vocab]  # each row contiguous, rows vocab + 5 apart
    logits[0] = float("-inf")
    for row, ties in ((1, [70, 200]), (2, [20, 21]), (3, [vocab - 1, 5]), (4, [16, 3])):
        logits[row, [t % vocab for t in ties]] = 1e4
    logits[5, [40 % vocab, 7 % vocab]] = float("nan")  # the first NaN wins, as in torch
    logits[6, 2 % vocab] = float("inf")
    got = row_argmax(logits, native=True)
    assert torch.equal(got, logits.argmax(dim=-1))
    assert torch.equal(row_argmax(logits[2:3], native=True), got[2:3])  # a row alone: the same


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [17, 100, 4096])
def test_native_row_top2_is_the_softmax_top_two_without_the_excluded_token(dtype: torch.dtype, vocab: int) -> None:
    from kernels.row_stats import row_top2_native

    gen = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn((12, vocab), generator=gen)).to(dtype)
    exclude = 3
    logits[0, exclude] = 1e4  # the excluded token is the row's largest: never chosen, never counted
    logits[1, [9, 12]] = 50.0  # a tie for first: the lower index first, the other second
    logits[2, [1, 2]] = float("-inf")
    index, prob = row_top2_native(logits, exclude)
    allowed = logits.double().index_fill(1, torch.tensor([exclude]), float("-inf"))
    expected = torch.softmax(allowed, dim=-1)
    first = allowed.argmax(dim=-1)
    second = allowed.scatter(1, first[:, None], float("-inf")).argmax(dim=-1)  # ties (bf16 has many): the lower
    assert torch.equal(index, torch.stack([first, second], dim=1))
    assert torch.equal(index[1], torch.tensor([9, 12]))
    torch.testing.assert_close(prob.double(), expected.gather(1, index), rtol=2e-6, atol=1e-9)
    index_alone, prob_alone = row_top2_native(logits[5:6].clone(), exclude)
    assert torch.equal(index_alone, index[5:6]) and torch.equal(prob_alone, prob[5:6])
    assert row_top2_native(logits.T, exclude) is None  # rows it cannot read in place: the caller's torch path


def test_bf16_rounding_of_sums_is_torchs_bit_for_bit() -> None:
    """The native kernels' fp32 -> bf16 rounding (the native forward's and the AMX products'): every
    vector and tail of normal values, ties, fp32 denormals (which the AVX512-BF16 instruction would
    flush to zero), infinities and values that round up to infinity, as torch rounds them; a NaN stays a
    NaN (torch writes its own NaN's bits)."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(4099, generator=gen) * torch.logspace(-45, 38, 4099).flip(0)  # down to denormals
    ties = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)]
    edges = [1e-40, -3e-39, 2**-149, 1.1754942e-38, 1.1754944e-38, 3.3961e38, float("inf"), float("-inf"), -0.0, 0.0]
    special = torch.tensor([*ties, *edges, float("nan")])
    for sums in (values, special, torch.cat([special, values[:2]])):
        out = torch.empty(sums.shape, dtype=torch.bfloat16)
        native.library().store_rows(sums.data_ptr(), sums.numel(), out.data_ptr(), native.DTYPES[torch.bfloat16])
        expected = sums.to(torch.bfloat16)
        nan = sums.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 100, 4096, 4099])
def test_native_row_confidence_is_the_float64_reference_in_fp32(dtype: torch.dtype, vocab: int) -> None:
    """A diffusion pass's choice and confidence per row: the argmax without the excluded token, its
    probability under the whole row's softmax; the same fp32 values as the reference's float64 softmax
    (on these rows bit for bit), from rows of any spread, the excluded token the largest or not."""
    from kernels.row_stats import row_confidence_native, row_stats_reference

    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn((64, vocab), generator=gen) * torch.rand((64, 1), generator=gen) * 12).to(dtype)
    logits[0, 3] = 60.0  # the excluded token dominates: the chosen token's probability is tiny
    logits[1] = 0.0  # a uniform row: the first allowed index
    prob, token = row_confidence_native(logits, 3)
    ref_prob, ref_token = row_stats_reference(logits, 3)
    assert torch.equal(token, ref_token) and torch.equal(prob, ref_prob)
    alone = row_confidence_native(logits[9:10].clone(), 3)
    assert torch.equal(alone[0], prob[9:10]) and torch.equal(alone[1], token[9:10])

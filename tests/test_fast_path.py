"""The lean forward: packed, fused products keep every row's result independent of the batch, stay
current when weights change, and the model still matches the official outputs with them off."""

from __future__ import annotations

import logging
import random

import pytest
import torch
import torch.nn.functional as F

import models
from kernels import native
from models import matmul
from models.config import RopeConfig
from models.layers import LoraWeights, Rotary, adapted_linear, merge_drafts
from tests.conftest import random_model
from tests.test_lossless import SPEC_MODES, _heldout_prompts
from tests.test_parity import ALONE, decoding_of, mismatch, record_id


def _weights(*shapes: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) / shape[1] ** 0.5) for shape in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shapes",
    # (256, 768): an MLP's down projection, which oneDNN's bf16 products on an AMX Xeon round otherwise
    # in calls of more than 32 rows (a quadratic-speculation forward)
    [[(768, 256)], [(256, 256), (64, 256), (64, 256)], [(96, 40)], [(256, 768)], [(1024, 1024)]],
)
def test_a_row_is_the_same_alone_and_in_any_batch(shapes, dtype):
    weights = [torch.nn.Parameter(w.detach().to(dtype)) for w in _weights(*shapes)]
    x = torch.randn(200, shapes[0][1], generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        full = matmul.linear(x, *weights)
        for rows in list(range(1, 20)) + [31, 33, 34, 36, 40, 45, 48, 57, 64, 65, 100, 130, 197]:
            for start in (0, 3):
                part = matmul.linear(x[start : start + rows], *weights)
                assert torch.equal(part, full[start : start + rows]), (rows, start)
    reference = torch.cat([x.float() @ w.float().T for w in weights], dim=-1)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(full.float(), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kernel", [matmul.Amx, matmul.Dpbf16, matmul.Fma32])
def test_packed_products_sum_a_row_alike_in_calls_of_any_row_count(kernel):
    """triserve's own kernels (kernels/csrc/amx_gemm.c, dpbf16_gemm.c: bf16; fma32_gemm.c: fp32) on
    their unrounded sums: a row alone, in blocks whose last is partial, and past them, always sums alike,
    with one thread or two; the first that runs here serves the fast path's weights of its dtype whose
    shape it takes, unpadded, and leaves the others to oneDNN (bf16) or BLAS (fp32)."""
    if not getattr(native, f"{kernel.kernel}_ready")():
        pytest.skip(f"the {kernel.kernel} kernel cannot run on this CPU")
    dtype, other = kernel.dtype, torch.float32 if kernel.dtype == torch.bfloat16 else torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    for n, k in ((384, 256), (256, 768), (128, 64), (1024, 256)):
        weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
        product = kernel(weight)
        x = torch.randn(80, k, generator=gen).to(dtype)
        whole = product.sums(x)
        for rows in [*range(1, 41), 47, 48, 63, 64, 65, 75]:
            for start in (0, 5):
                assert torch.equal(product.sums(x[start : start + rows]), whole[start : start + rows]), (n, k, rows)
        torch.testing.assert_close(whole, x.double() @ weight.double().T, rtol=1e-5, atol=1e-5, check_dtype=False)
        with pytest.raises(TypeError):  # never reads other rows' bytes as its own dtype
            product.sums(x.to(other))
        threads = torch.get_num_threads()
        try:  # columns shared out among threads: the same sums
            torch.set_num_threads(2)
            assert torch.equal(product.sums(x), whole) and torch.equal(product.sums(x[:3]), whole[:3])
        finally:
            torch.set_num_threads(threads)
    # a strided view (a tensor-parallel shard) is packed from a copy that lives through the call
    wide = torch.randn(128, 96, generator=gen).to(dtype)
    view = wide[:, 16:80]
    x = torch.randn(5, 64, generator=gen).to(dtype)
    torch.testing.assert_close(kernel(view).sums(x), x.double() @ view.double().T, rtol=1e-5, atol=1e-5,
                               check_dtype=False)  # fmt: skip
    with pytest.raises(ValueError):  # a shape it does not take
        kernel(torch.zeros(96, 40, dtype=dtype))
    first = kernel.kernel if dtype == torch.float32 else "amx" if native.amx_ready() else "dpbf16"
    with torch.inference_mode():
        fits, odd = (torch.nn.Parameter(w.detach().to(dtype)) for w in _weights((384, 256), (96, 40)))
        prepared = matmul.prepared((fits,))
        assert (prepared.backend, prepared.min_rows, prepared.max_rows) == (first, 1, 64)
        assert matmul.backends_for(odd) == (["packed"] if dtype == torch.bfloat16 else ["blas", "packed"])
        assert matmul.probe_rows(kernel.kernel, 96, 40, dtype, 1) == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_calls_are_padded_unless_the_probe_shows_the_backend_agrees(dtype):
    (weight,) = _weights((64, 32))
    weight = torch.nn.Parameter(weight.detach().to(dtype))
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.inference_mode():
        prepared = matmul.prepared((weight,))
        if prepared.product is None:
            pytest.skip(f"no fast-path backend for {dtype} on this CPU")
        assert prepared.backend == matmul.backends_for(weight)[0]  # the preferred one probes invariant here
        probe = matmul.probe_rows(prepared.backend, *weight.shape, dtype, torch.get_num_threads())
        assert (prepared.min_rows, prepared.max_rows) == probe
        full = prepared(x)
        seen: list[int] = []
        product = prepared.product
        prepared.product = lambda rows: seen.append(rows.shape[0]) or product(rows)
        prepared.min_rows = 4  # what a CPU whose small-call kernels round differently gets
        for rows in (1, 2, 3):
            assert torch.equal(prepared(x[:rows]), full[:rows])
    assert seen == [4, 4, 4]


def test_fp32_products_prefer_blas_on_a_transposed_copy():
    """BLAS on a transposed copy costs a fraction of oneDNN's packed product at the row counts decoding
    uses (models/matmul.py); a CPU where it does not probe invariant falls back to packing."""
    (weight,) = _weights((96, 64))
    with torch.inference_mode():
        prepared = matmul.prepared((weight,))
        if not matmul.backends_for(weight):
            pytest.skip("no oneDNN on this build")
        blas = matmul.probe_rows("blas", 96, 64, torch.float32, torch.get_num_threads())
        assert prepared.backend == ("blas" if blas[1] else "packed")


def test_a_draft_adapter_adds_in_fp32_and_rounds_a_row_alike_in_any_batch():
    gen = torch.Generator().manual_seed(4)
    lora = LoraWeights(a=torch.randn(4, 16, generator=gen), b=torch.randn(8, 4, generator=gen), scale=0.5)
    out = torch.randn(6, 8, generator=gen).bfloat16()
    x = torch.randn(6, 16, generator=gen).bfloat16()
    with torch.inference_mode():
        every = lora.apply(out, x, torch.arange(6))  # a lone request's draft: no gather
        some = lora.apply(out, x, torch.tensor([4, 1]))
    assert torch.equal(some[[4, 1]], every[[4, 1]])
    assert torch.equal(some[[0, 2, 3, 5]], out[[0, 2, 3, 5]])
    expected = (out.float() + 0.5 * (x.float() @ lora.a.T @ lora.b.T)).bfloat16()
    torch.testing.assert_close(every, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_draft_rows_round_alike_alone_and_beside_other_rows(fast_path_on, dtype):
    gen = torch.Generator().manual_seed(5)
    weight = torch.nn.Parameter((torch.randn(24, 16, generator=gen) / 4).to(dtype))
    lora = LoraWeights(a=torch.randn(4, 16, generator=gen), b=torch.randn(24, 4, generator=gen) / 4, scale=0.5)
    x = torch.randn(6, 16, generator=gen).to(dtype)
    with torch.inference_mode():
        assert merge_drafts(x)
        alone = adapted_linear(x[[4, 1]], (weight,), (lora,), torch.arange(2))  # a lone request's draft
        mixed = adapted_linear(x, (weight,), (lora,), torch.tensor([4, 1]))
        assert torch.equal(mixed[[4, 1]], alone)
        assert torch.equal(mixed[[0, 2, 3, 5]], matmul.linear(x, weight)[[0, 2, 3, 5]])
        updated = x[[4, 1]].float() @ weight.float().T + 0.5 * x[[4, 1]].float() @ lora.a.T @ lora.b.T
        tolerance = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(alone.float(), updated, rtol=tolerance, atol=tolerance)
    lora.b.mul_(2)  # a changed factor (an optimizer step) is merged again
    with torch.inference_mode():
        again = adapted_linear(x[[4, 1]], (weight,), (lora,), torch.arange(2))
    updated = x[[4, 1]].float() @ weight.float().T + 0.5 * x[[4, 1]].float() @ lora.a.T @ lora.b.T
    torch.testing.assert_close(again.float(), updated, rtol=tolerance, atol=tolerance)


def test_prepared_weights_follow_parameter_changes():
    (weight,) = _weights((32, 16))
    x = torch.randn(5, 16)
    with torch.inference_mode():
        before = matmul.linear(x, weight)
        weight.mul_(2)  # an in-place update (an optimizer step)
        torch.testing.assert_close(matmul.linear(x, weight), 2 * before)
        weight.data = torch.zeros(32, 16)  # a rebinding (a reload)
        assert torch.equal(matmul.linear(x, weight), torch.zeros(5, 32))


def test_prepared_weights_follow_the_thread_count(fast_path_on):
    """A model warmed up at load and then run with another thread count prepares its products again:
    the probes that chose a backend and its row padding hold for the thread count they ran with."""
    (weight,) = _weights((32, 16))
    x = torch.randn(5, 16)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            matmul.linear(x, weight)
            assert weight._triserve_prepared.threads == 1
            torch.set_num_threads(2)
            matmul.linear(x, weight)
            assert weight._triserve_prepared.threads == 2
    finally:
        torch.set_num_threads(threads)


def test_load_model_warms_up_unless_told_not_to(fixture_path, caplog):
    """What a first forward prepares is prepared at load, not by the first request."""
    with caplog.at_level(logging.INFO, logger="models.loading"):
        warm = models.load_model(fixture_path)
    assert any("warmed up" in record.getMessage() for record in caplog.records)
    cold = models.load_model(fixture_path, warm_up=False)
    assert getattr(cold.encoder.layers[0].mlp.down_proj.weight, "_triserve_prepared", None) is None
    if matmul.fast_path_on():
        assert warm.encoder.layers[0].mlp.down_proj.weight._triserve_prepared is not None


def test_a_model_loaded_under_inference_mode_decodes_the_golden_tokens(fixture_path, golden_records):
    """Found running bench/engine_throughput.py: parameters created under ``torch.inference_mode()``
    keep no version counter, and the prepared-weight cache's fingerprint crashed on them."""
    record = next(r for r in golden_records if r["mode"] == "ar")
    with torch.inference_mode():
        model = models.load_model(fixture_path)
        out = models.generate(model, record["prompt_ids"], mode="ar", max_new_tokens=16)
    assert out.tokens == record["output_ids"][:16]


def test_training_takes_the_differentiable_path():
    a, b = _weights((8, 6), (4, 6))
    x = torch.randn(3, 6, requires_grad=True)
    out = matmul.linear(x, a, b)
    out.sum().backward()
    assert a.grad is not None and b.grad is not None and x.grad is not None
    torch.testing.assert_close(out, torch.cat([F.linear(x, a), F.linear(x, b)], dim=-1))


def test_rope_table_rows_equal_direct_computation():
    rope = RopeConfig.from_dict(
        {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 16.0,
            "original_max_position_embeddings": 64,
            "llama_4_scaling_beta": 0.1,
        },
        None,
    )
    rotary = Rotary(rope, 32)
    positions = torch.tensor([0, 5, 63, 64, 200, 7, 7])
    direct = rotary(positions, torch.float32)
    looked_up = rotary.lookup(positions, torch.float32, upto=201)
    assert rotary._table[0].shape[0] == 256  # grown to a power of two past the request
    for a, b in zip(direct, looked_up):
        assert torch.equal(a, b)
    far = torch.tensor([1000])
    assert all(torch.equal(a, b) for a, b in zip(rotary(far, torch.float32), rotary.lookup(far, torch.float32, 1001)))


@pytest.fixture
def fast_path_on(monkeypatch):
    """For tests of the fast path itself, whatever ``TRISERVE_FAST_PATH`` the suite runs under."""
    monkeypatch.setattr(matmul, "FAST_PATH", True)


@pytest.fixture
def fast_path_off(monkeypatch):
    monkeypatch.setattr(matmul, "FAST_PATH", False)


def test_golden_parity_with_the_fast_path_off(fast_path_off, fixture_model):
    """The records test_parity decodes alone with the fast path on (one per mode and threshold)."""
    for record in ALONE.values():
        out = models.generate(fixture_model, record["prompt_ids"], **decoding_of(record))
        why = mismatch(record, out.tokens, out.nfe)
        assert why is None, (record_id(record), why)
    assert len(ALONE) >= 4


@pytest.mark.parametrize("block_length", [4, 32])
def test_lossless_with_the_fast_path_off(fast_path_off, fixture_model, block_length):
    for prompt in _heldout_prompts(fixture_model.tokenizer, 2, random.Random(block_length)):
        ar = models.generate(fixture_model, prompt, mode="ar", max_new_tokens=24)
        for mode in SPEC_MODES:
            spec = models.generate(fixture_model, prompt, mode=mode, max_new_tokens=24, block_length=block_length)
            assert spec.tokens == ar.tokens, (mode, block_length)


def test_batched_rows_equal_single_rows_with_the_fast_path_off(fast_path_off):
    model = random_model(seed=3)
    prompt = [1, 9, 17, 33, 5]
    ar = models.generate(model, prompt, mode="ar", max_new_tokens=12)
    for mode in SPEC_MODES:
        assert models.generate(model, prompt, mode=mode, max_new_tokens=12, block_length=4).tokens == ar.tokens

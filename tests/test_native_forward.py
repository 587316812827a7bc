"""The native forward (models/native_forward.py): which models it serves, that it computes what the
Python layers compute, and that a row's logits never depend on what shares its forward."""

from __future__ import annotations

import pytest
import torch

import models
from kernels import native
from kernels.rmsnorm import native_is_reference
from models import matmul, native_forward
from models.batch import pack
from models.engine import KVCacheManager
from models.layers import LoraWeights
from models.modes.base import draft_segment
from models.segments import causal_segment
from tests.conftest import REPO, random_model
from tests.test_lossless import _assert_spec_equals_ar_on_heldout

BUNDLED = REPO / "models" / "bundled" / "tiny-code"
PAGE = 16


@pytest.fixture(autouse=True)
def fast_path_on(monkeypatch):
    """On, whatever ``TRISERVE_FAST_PATH`` the suite runs under; skipped where the native kernels cannot
    serve these models at all (no compiler, or a CPU whose torch sums RMSNorm's squares otherwise)."""
    monkeypatch.setattr(matmul, "FAST_PATH", True)
    if native.library() is None or not all(native_is_reference(w, torch.float32, 1e-5) for w in (32, 256)):
        pytest.skip("the native forward serves no model on this machine")


@pytest.fixture(scope="module")
def bundled_fp32():
    """The bundled model in fp32, with its draft adapter: the native forward's adapted products."""
    return models.load_model(BUNDLED, dtype=torch.float32, warm_up=False)


def _bf16_served() -> bool:
    return matmul.cpu_has_fast_half() and matmul.blas_function(native_forward.GEMM[torch.bfloat16]) is not None


@pytest.fixture(scope="module")
def bundled_bf16():
    """The bundled model as served where the CPU computes bf16 (with its adapter): the AMX kernel's bf16
    products where the CPU has AMX, else MKL's."""
    if not _bf16_served():
        pytest.skip("no bf16 instructions or no MKL bf16 GEMM here: bf16 models take the Python layers")
    return models.load_model(BUNDLED, dtype=torch.bfloat16, warm_up=False)


def _served(model) -> bool:
    with torch.inference_mode():
        return native_forward.decoder_for(model) is not None


class Steps:
    """Sequences with their own prompts, prefilled alone, then forwards of segments over them."""

    def __init__(self, model, prompts: list[list[int]]) -> None:
        self.model = model
        pages = sum(len(p) + 48 for p in prompts) // PAGE + len(prompts) + 1
        self.cache = model.new_cache(num_pages=pages, page_size=PAGE)
        self.kv = KVCacheManager(pages, PAGE, device="cpu")
        self.lengths = []
        for seq, prompt in enumerate(prompts):
            self.kv.add(seq)
            self.kv.reserve(seq, len(prompt) + 48)
            self.run([(seq, causal_segment(prompt, 0, write=True))])
            self.kv.set_length(seq, len(prompt))
            self.lengths.append(len(prompt))

    def run(self, items) -> list[torch.Tensor]:
        """Logits of each segment of one forward over ``items``."""
        batch = pack(items, self.kv)
        return list(self.model(batch, self.cache).split([len(seg.read_rows) for _, seg in items]))

    def segments(self, tokens: list[int]) -> list:
        """A verify block for sequence 0, a draft (adapter rows) for 1, an AR step for 2."""
        mask = self.model.config.mask_token_id
        return [
            (0, causal_segment(tokens, self.lengths[0], write=True)),
            (1, draft_segment(tokens[0], self.lengths[1], 8, mask)),
            (2, causal_segment(tokens[:1], self.lengths[2], write=True)),
        ]


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [[1] + torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (37, 20, 61)]


def test_it_serves_fp32_models_on_the_fast_path_and_no_other(fixture_model, bundled_fp32, monkeypatch):
    assert _served(fixture_model) and _served(bundled_fp32)
    assert not _served(random_model(head_dim=8))  # heads the native attention's vectors do not divide
    bf16 = models.load_model(BUNDLED, dtype=torch.bfloat16, warm_up=False)
    assert _served(bf16) == _bf16_served()
    assert _served(random_model(head_dim=16))
    sharded = random_model(head_dim=16)
    sharded.encoder.layers[1].mlp.reduce = lambda x: x  # what tensor parallelism swaps in, at load
    assert not _served(sharded)
    monkeypatch.setattr(native, "library", lambda: None)  # no compiler: the Python layers serve
    assert not _served(random_model(head_dim=16))


@pytest.mark.parametrize("name", ["fixture", "bundled_fp32", "random", "bundled_bf16"])
def test_it_computes_what_the_python_layers_compute(name, fixture_model, bundled_fp32, monkeypatch, request):
    if name == "bundled_bf16":
        model = request.getfixturevalue("bundled_bf16")
        if not (native.amx_ready() or native.dpbf16_ready()):  # else both take one packed kernel on one copy
            # the Python layers on the same bf16 products (their default is then oneDNN's, which rounds otherwise)
            monkeypatch.setattr(matmul, "backends_for", lambda weight: ["mkl_bf16"])
    else:
        model = {"fixture": fixture_model, "bundled_fp32": bundled_fp32, "random": random_model(head_dim=16)}[name]
    assert _served(model)
    prompts = _prompts(model.config.vocab_size)
    tokens = [5, 9, 11, 13, 7, 6, 8, 10]

    def logits() -> list[torch.Tensor]:
        steps = Steps(model, prompts)
        return steps.run(steps.segments(tokens)) + steps.run([(2, causal_segment([4] * 8, 0, write=False))])

    native_logits = logits()
    monkeypatch.setattr(native_forward, "decoder_for", lambda model: None)
    python_logits = logits()
    for got, want in zip(native_logits, python_logits):
        # only SiLU rounds otherwise (its own exponential): agreement to float rounding, in bf16 to about
        # a bf16 rounding of an activation here and there
        tolerance = 1e-4 if model.dtype == torch.float32 else 0.15
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= (1 if model.dtype == torch.float32 else 0.9)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_is_the_same_alone_and_beside_other_requests(dtype, threads, request):
    """A verify block beside another request's draft (adapter rows) and a third's AR step: each
    request's logits are those of its forward alone, bit for bit, and the AR step's are the verify
    block's first row's (the same token at the same position over the same cache)."""
    model = request.getfixturevalue(f"bundled_{dtype}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _served(model)
        prompts = _prompts(model.config.vocab_size)
        prompts[2] = prompts[0]
        tokens = [5, 9, 11, 13, 7, 6, 8, 10]
        together = Steps(model, prompts)
        mixed = together.run(together.segments(tokens))
        apart = Steps(model, prompts)
        alone = [apart.run([item])[0] for item in apart.segments(tokens)]
    finally:
        torch.set_num_threads(previous)
    for got, want in zip(mixed, alone):
        assert torch.equal(got, want)
    assert torch.equal(mixed[2][0], mixed[0][0])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rows_read_compute_the_same_when_the_others_stop_early(dtype, request):
    """Past the last layer's attention only the rows a step reads go on: a draft that reads three of its
    rows, beside a verify block that reads every row and a prefill chunk that reads only its last, gives
    those rows the logits they get when every row is read, bit for bit (the adapter still on the draft's
    rows only), and a step that reads no row at all still writes its keys and values."""
    model = request.getfixturevalue(f"bundled_{dtype}")
    assert _served(model)
    mask = model.config.mask_token_id
    prompts = _prompts(model.config.vocab_size)
    tokens = [5, 9, 11, 13, 7, 6, 8, 10]
    chunk = [17, 23, 29, 31, 37, 41]

    def forward(draft_rows: list[int], chunk_rows: list[int] | None) -> tuple[Steps, list[torch.Tensor]]:
        steps = Steps(model, prompts)
        items = [
            (0, causal_segment(tokens, steps.lengths[0], write=True)),
            (1, draft_segment(tokens[0], steps.lengths[1], 8, mask, logit_rows=draft_rows)),
            (2, causal_segment(chunk, steps.lengths[2], write=True, logit_rows=chunk_rows)),
        ]
        return steps, steps.run(items)

    _, every = forward(list(range(8)), None)
    _, some = forward([2, 5, 6], [len(chunk) - 1])
    assert torch.equal(some[0], every[0])
    assert torch.equal(some[1], every[1][[2, 5, 6]])
    assert torch.equal(some[2], every[2][-1:])
    # a chunk that reads nothing writes the same cache: the next token's logits agree
    reading, _ = forward([1], [len(chunk) - 1])
    silent, _ = forward([1], [])
    after = [(2, causal_segment([43], reading.lengths[2] + len(chunk), write=True))]
    for steps in (reading, silent):
        steps.kv.set_length(2, steps.lengths[2] + len(chunk))
    assert torch.equal(reading.run(after)[0], silent.run(after)[0])


@pytest.mark.parametrize("block_length", (8, 32))
def test_speculation_equals_ar_through_it(bundled_fp32, block_length):
    assert _served(bundled_fp32)
    _assert_spec_equals_ar_on_heldout(bundled_fp32, 2, block_length)


@pytest.mark.parametrize("kernel", ["dpbf16", "mkl_bf16"])
def test_without_amx_bf16_products_take_the_next_kernel_and_rows_stay_invariant(kernel, monkeypatch):
    """On a CPU with bf16 instructions but no AMX (or a kernel that withholds the tile registers), the
    native forward multiplies with AVX512-BF16 dot products, or without those through MKL's bf16 GEMM;
    a row is still the same alone and beside others, and speculation still emits AR's tokens."""
    if not _bf16_served():
        pytest.skip("no bf16 instructions or no MKL bf16 GEMM here")
    if kernel == "dpbf16" and not native.dpbf16_ready():
        pytest.skip("no AVX512-BF16 here")
    monkeypatch.setattr(native, "amx_ready", lambda: False)
    if kernel == "mkl_bf16":
        monkeypatch.setattr(native, "dpbf16_ready", lambda: False)
    model = models.load_model(BUNDLED, dtype=torch.bfloat16, warm_up=False)
    with torch.inference_mode():
        decoder = native_forward.decoder_for(model)
    assert decoder is not None and {p.backend for p in decoder.prepared if p is not None} == {kernel}
    prompts = _prompts(model.config.vocab_size)
    tokens = [5, 9, 11, 13, 7, 6, 8, 10]
    together = Steps(model, prompts)
    mixed = together.run(together.segments(tokens))
    apart = Steps(model, prompts)
    for got, item in zip(mixed, apart.segments(tokens)):
        assert torch.equal(got, apart.run([item])[0])
    _assert_spec_equals_ar_on_heldout(model, 1, 32)


def test_a_changed_weight_or_adapter_is_seen():
    model = random_model(head_dim=16)
    with torch.inference_mode():
        first = native_forward.decoder_for(model)
        assert first is not None and native_forward.decoder_for(model) is first  # kept while nothing changed
    with torch.no_grad():
        model.encoder.layers[0].mlp.down_proj.weight.mul_(2)  # an optimizer step, in place
    with torch.inference_mode():
        second = native_forward.decoder_for(model)
    assert second is not None and second is not first
    gen = torch.Generator().manual_seed(6)
    for layer in model.encoder.layers:
        lora = LoraWeights(a=torch.randn(2, 64, generator=gen), b=torch.randn(32, 2, generator=gen), scale=1.0)
        layer.set_lora("o_proj", lora)
    with torch.inference_mode():
        third = native_forward.decoder_for(model)
    assert third is not None and third is not second
    assert third.model.layer[0].o_draft.weight  # draft rows now multiply the merged weight
    with torch.no_grad():
        model.encoder.norm.weight.copy_(torch.randn(model.config.hidden_size, generator=gen))  # it runs this too
    with torch.inference_mode():
        fourth = native_forward.decoder_for(model)
    assert fourth is not None and fourth is not third
    assert fourth.model.final_norm == model.encoder.norm.weight.data_ptr()


def test_each_int8_drafts_setting_keeps_its_decoder_until_a_weight_changes():
    """Switching ``int8_drafts`` back and forth reuses each setting's decoder (bench/tpf.py switches it per
    prompt); a changed weight rebuilds the one in use and drops the other's."""
    model = random_model(head_dim=16)
    kept = lambda: model.__dict__["_native_decoders"]  # noqa: E731
    with torch.inference_mode():
        model.int8_drafts = False
        plain = native_forward.decoder_for(model)
        model.int8_drafts = True
        int8 = native_forward.decoder_for(model)
        assert plain is not None and int8 is not None and int8 is not plain
        model.int8_drafts = False
        assert native_forward.decoder_for(model) is plain
        model.int8_drafts = True
        assert native_forward.decoder_for(model) is int8 and len(kept()) == 2
    with torch.no_grad():
        model.encoder.layers[1].self_attn.o_proj.weight.mul_(2)
    with torch.inference_mode():
        rebuilt = native_forward.decoder_for(model)
        assert rebuilt is not int8 and list(kept()) == [True]  # the plain decoder, now stale, let go
        model.int8_drafts = False
        assert native_forward.decoder_for(model) not in (plain, None)


@pytest.mark.parametrize("shape", [(384, 256), (256, 768)])
def test_a_lone_bf16_row_is_padded_where_mkl_sums_it_otherwise(shape):
    """MKL's lone-row call is a GEMV that sums in another order than calls of two or more rows; rounded
    to bf16 the difference shows on few outputs, so the probe compares the unrounded sums and pads."""
    if not _bf16_served():
        pytest.skip("no bf16 instructions or no MKL bf16 GEMM here")
    gen = torch.Generator().manual_seed(8)
    weight = torch.nn.Parameter((torch.randn(shape, generator=gen) / shape[1] ** 0.5).bfloat16())
    x = torch.randn(256, shape[1], generator=gen).bfloat16()
    with torch.inference_mode():
        product = matmul.prepared((weight,), ("mkl_bf16",))
        assert product.backend == "mkl_bf16" and product.min_rows >= 2
        together = product(x)
        for i in range(x.shape[0]):
            assert torch.equal(product(x[i : i + 1]), together[i : i + 1]), i

"""Speculative drafts in int8 (TriModeModel.int8_drafts, kernels/csrc/int8_gemm.c): the product
approximates the model's and gives a row the same result in any call; only draft rows take it; and
speculation stays exactly AR at temperature 0 and AR-distributed at temperature 1."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import models
from kernels import native
from models import matmul, native_forward
from models.calibration import device_key
from models.engine.host import EngineSettings, load_host
from models.modes.base import draft_segment
from models.segments import causal_segment
from tests.conftest import REPO, random_model
from tests.test_distribution import SAMPLES, chi_square_p_value, exact_distributions, sample_counts
from tests.test_lossless import _assert_spec_equals_ar_on_heldout
from tests.test_native_forward import Steps

BUNDLED = REPO / "models" / "bundled" / "tiny-code"


@pytest.fixture(autouse=True)
def int8_runs(monkeypatch):
    """The fast path on (whatever ``TRISERVE_FAST_PATH`` the suite runs under); skipped where the int8
    kernel cannot run (no compiler, or a CPU without AVX512-VNNI)."""
    monkeypatch.setattr(matmul, "FAST_PATH", True)
    if not native.int8_ready():
        pytest.skip("no AVX512-VNNI (or no native kernels) here: drafts keep the model's products")


def _loaded(dtype: torch.dtype):
    if dtype == torch.bfloat16 and not matmul.cpu_has_fast_half():
        pytest.skip("bf16 models take the Python layers on this CPU")
    return models.load_model(BUNDLED, dtype=dtype, warm_up=False)


@pytest.mark.parametrize("shape", [(384, 256), (256, 768), (1536, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_product_approximates_and_a_row_is_the_same_in_any_call(shape, dtype):
    gen = torch.Generator().manual_seed(5)
    weight = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    rows = torch.randn((37, shape[1]), generator=gen).to(dtype)
    product = matmul.Int8(weight)
    want = rows.float() @ weight.float().T
    got = product(rows)
    assert float((got - want).norm() / want.norm()) < 0.02  # int8 rounding: about 1% here
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for count in (1, 3, 8, 9, 17):
                assert torch.equal(product(rows[:count]), got[:count]), (threads, count)
            assert torch.equal(product(rows[20:21]), got[20:21])
    finally:
        torch.set_num_threads(previous)


def test_shapes_the_kernel_does_not_take_are_refused():
    with pytest.raises(ValueError, match="int8 kernel takes no weight"):
        matmul.Int8(torch.randn(40, 256))  # outputs not a multiple of 32
    product = matmul.Int8(torch.randn(64, 32))
    with pytest.raises(TypeError, match="rows of 32"):
        product(torch.randn(2, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_draft_rows_take_it(dtype):
    """A verify block beside another request's draft and a third's AR step: with int8 drafts the verify
    block's and the AR step's logits are the model's bit for bit, the draft's differ from the model's
    draft by int8 rounding only, and each request's rows are what they are in a forward alone."""
    model = _loaded(dtype)
    gen = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(4, model.config.vocab_size, (n,), generator=gen).tolist() for n in (37, 20, 61)]
    tokens = [5, 9, 11, 13]

    def run(int8: bool, apart: bool = False) -> list[torch.Tensor]:
        model.int8_drafts = int8
        steps = Steps(model, prompts)
        items = steps.segments(tokens)
        with torch.inference_mode():
            assert native_forward.drafts_in_int8(model) == int8
        return [steps.run([item])[0] for item in items] if apart else steps.run(items)

    plain, int8, int8_apart = run(False), run(True), run(True, apart=True)
    assert torch.equal(int8[0], plain[0]) and torch.equal(int8[2], plain[2])
    assert not torch.equal(int8[1], plain[1])
    assert float((int8[1] - plain[1]).norm() / plain[1].norm()) < 0.05
    assert (int8[1].argmax(-1) == plain[1].argmax(-1)).float().mean() >= 0.7
    for together, alone in zip(int8, int8_apart):
        assert torch.equal(together, alone)


def test_draft_rows_take_the_int8_head_alone_or_beside_others():
    """The head of a draft's rows is an int8 product too, whatever shares the step: in a step with a verify
    block and an AR step it multiplies the draft's rows only, and those rows' logits are the draft's alone."""
    model = _loaded(torch.bfloat16 if matmul.cpu_has_fast_half() else torch.float32)
    model.int8_drafts = True
    with torch.inference_mode():
        decoder = native_forward.decoder_for(model)
    assert decoder is not None and decoder.draft_head is not None
    calls: list[int] = []
    head = decoder.draft_head

    def counted(hidden: torch.Tensor) -> torch.Tensor:
        calls.append(hidden.shape[0])
        return head(hidden)

    decoder.draft_head = counted
    gen = torch.Generator().manual_seed(4)
    prompts = [[1] + torch.randint(4, model.config.vocab_size, (n,), generator=gen).tolist() for n in (30, 25, 40)]
    steps = Steps(model, prompts)
    items = steps.segments([5, 9, 11, 13])
    calls.clear()
    together = steps.run(items)
    assert calls == [together[1].shape[0]]  # the draft's rows, not the verify block's or the AR step's
    calls.clear()
    alone = steps.run([items[1]])[0]
    assert calls == [alone.shape[0]] and torch.equal(alone, together[1])


@pytest.mark.parametrize("block_length", (8, 32))
def test_speculation_with_int8_drafts_equals_ar(block_length):
    model = _loaded(torch.bfloat16 if matmul.cpu_has_fast_half() else torch.float32)
    model.int8_drafts = True
    _assert_spec_equals_ar_on_heldout(model, 2, block_length)


def test_speculation_with_int8_drafts_keeps_the_ar_distribution():
    """The chi-square check of tests/test_distribution.py on a small model the native forward serves
    (heads of 16), its drafts in int8: rejection sampling takes the drafts' own probabilities."""
    model = random_model(seed=3, vocab_size=12, block_size=4, head_dim=16)
    model.int8_drafts = True
    with torch.inference_mode():
        assert native_forward.drafts_in_int8(model)
    counts, accepted_a_draft = sample_counts(model, "linear_spec")
    for observed, expected in zip(counts, exact_distributions(model)):
        assert chi_square_p_value(observed, expected) > 1e-3
    assert accepted_a_draft > SAMPLES // 20, "drafts were hardly ever accepted: the test did not exercise them"


def test_the_router_s_priors_are_kept_apart():
    """Calibrated figures of int8 drafts are not those of the model's own: replicas load the entry of
    their own draft precision."""
    plain, int8 = device_key("cpu", 1, torch.bfloat16), device_key("cpu", 1, torch.bfloat16, int8_drafts=True)
    assert plain != int8 and int8.endswith(":int8-drafts")


def test_a_replica_takes_it_from_its_settings():
    """``int8_drafts`` of a model's config reaches the engine's model, its log line and its priors' key."""
    host = load_host(EngineSettings(str(BUNDLED), int8_drafts=True, engine={"num_pages": 32}))
    assert host.engine.model.int8_drafts and host.info["int8_drafts"]
    assert host.info["device"].endswith(":int8-drafts")
    assert not load_host(EngineSettings(str(BUNDLED), engine={"num_pages": 32})).info["int8_drafts"]


def test_the_generate_command_takes_it():
    """``triserve generate --int8-drafts``: the text of AR, drafted in int8."""

    def run(*extra: str) -> list[str]:
        command = [sys.executable, "-m", "deployments.cli", "generate", "--model", str(BUNDLED), "--prompt",
                   "def parse(line):\n", "--max-new-tokens", "32", *extra]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    drafted = run("--mode", "linear_spec", "--block-length", "8", "--int8-drafts")
    assert drafted[:-1] == run("--mode", "ar")[:-1]
    assert drafted[-1].startswith("[linear_spec] tokens=32 ")


@pytest.mark.parametrize("int8", [False, True])
def test_drafts_apart_from_each_other_compute_as_alone(int8):
    """Two requests' drafts with an AR step between them (the rows of each product gathered, not
    consecutive): every request's logits are those of its forward alone, bit for bit."""
    model = _loaded(torch.float32)
    model.int8_drafts = int8
    mask = model.config.mask_token_id
    gen = torch.Generator().manual_seed(4)
    prompts = [[1] + torch.randint(4, model.config.vocab_size, (n,), generator=gen).tolist() for n in (23, 41, 30)]
    steps = Steps(model, prompts)
    items = [
        (0, draft_segment(7, steps.lengths[0], 8, mask)),
        (1, causal_segment([9], steps.lengths[1], write=True)),
        (2, draft_segment(5, steps.lengths[2], 4, mask)),
    ]
    together = steps.run(items)
    apart = Steps(model, prompts)
    for got, item in zip(together, items):
        assert torch.equal(got, apart.run([item])[0])

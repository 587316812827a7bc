"""Self-speculation at temperature 0 emits exactly the AR greedy tokens."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch

import models
from tests.conftest import REPO, random_model

BLOCK_LENGTHS = (4, 8, 16, 32)
SPEC_MODES = ("linear_spec", "quadratic_spec")


def _heldout_prompts(tokenizer, count: int, rng: random.Random) -> list[list[int]]:
    """Prompts cut from held-out standard-library modules (names t-z) at random places."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("[t-z]*.py"))
    prompts = []
    for path in rng.sample(files, count):
        ids = tokenizer.encode(path.read_text(errors="replace"))
        start = rng.randrange(1, max(2, len(ids) - 64))
        prompts.append([tokenizer.bos_token_id] + ids[start : start + rng.randrange(8, 48)])
    return prompts


def _assert_spec_equals_ar_on_heldout(model, prompts: int, block_length: int) -> None:
    rng = random.Random(block_length)
    for prompt in _heldout_prompts(model.tokenizer, prompts, rng):
        ar = models.generate(model, prompt, mode="ar", max_new_tokens=40)
        for mode in SPEC_MODES:
            spec = models.generate(model, prompt, mode=mode, max_new_tokens=40, block_length=block_length)
            assert spec.tokens == ar.tokens, (mode, block_length, prompt)


@pytest.mark.parametrize("block_length", BLOCK_LENGTHS)
def test_spec_equals_ar_on_fixture(fixture_model, block_length):
    _assert_spec_equals_ar_on_heldout(fixture_model, 3, block_length)


@pytest.mark.parametrize("block_length", (8, 32))
def test_spec_equals_ar_on_the_bundled_model_in_bf16(block_length):
    """bf16 is what the default app computes on CPUs with bf16 instructions (oneDNN-packed bf16
    products there; the padded reference elsewhere): verify rows must round like AR steps in it too."""
    model = models.load_model(REPO / "models" / "bundled" / "tiny-code", dtype=torch.bfloat16)
    _assert_spec_equals_ar_on_heldout(model, 2, block_length)


def test_spec_equals_ar_random_prompts_random_model():
    model = random_model(seed=7)
    rng = random.Random(0)
    accepted_any = False
    for trial in range(24):
        prompt = [1] + [rng.randrange(4, model.config.vocab_size) for _ in range(rng.randrange(1, 30))]
        length = BLOCK_LENGTHS[trial % len(BLOCK_LENGTHS)]
        ar = models.generate(model, prompt, mode="ar", max_new_tokens=24)
        for mode in SPEC_MODES:
            spec = models.generate(model, prompt, mode=mode, max_new_tokens=24, block_length=length)
            assert spec.tokens == ar.tokens, (mode, length, prompt)
            accepted_any |= any(n > 1 for n in spec.accepted_lengths)
    assert accepted_any, "no draft token was ever accepted: the test did not exercise acceptance"


@pytest.mark.parametrize("block_length", (4, 8))
def test_sparse_quadratic_equals_ar_for_any_branch_count(block_length):
    """One branch drafted ahead (cycles without a draft after a miss), two, four, and every acceptance
    length (the dense scheme: a draft in every cycle after the first)."""
    model = random_model(seed=7)
    rng = random.Random(block_length)
    missed = False
    for _ in range(6):
        prompt = [1] + [rng.randrange(4, model.config.vocab_size) for _ in range(rng.randrange(1, 30))]
        ar = models.generate(model, prompt, mode="ar", max_new_tokens=24)
        for branches in (1, 2, 4, block_length + 1):
            spec = models.generate(
                model, prompt, mode="quadratic_spec", max_new_tokens=24, block_length=block_length, branches=branches
            )
            assert spec.tokens == ar.tokens, (branches, prompt)
            cycles_with_a_draft, cycles = len(spec.accepted_lengths), spec.nfe - 1  # the prefill counts
            if branches > block_length:
                assert cycles_with_a_draft == cycles - 1  # only the first cycle has nothing to verify
            missed |= cycles_with_a_draft < cycles - 1
    assert missed, "no acceptance length ever fell outside the drafted branches"

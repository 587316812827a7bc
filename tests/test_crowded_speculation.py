"""Speculation in a crowded batch: speculative requests take AR steps (verifies of an empty draft)
when the engine's policy says their rows cost more than their drafts save, and their output stays
AR's tokens at temperature 0 (AR's distribution at temperature 1: tests/test_distribution.py)."""

from __future__ import annotations

import random

import pytest
import torch

import models
from deployments.config import ModelSpec
from models.engine import Engine
from models.engine.costs import OptionStats, may_speculate
from models.modes import DecodeParams
from tests.conftest import REPO, random_model
from tests.test_engine import _drain

SPEC_MODES = ("linear_spec", "quadratic_spec")


@pytest.fixture(scope="module")
def bundled():
    """The bundled model, whose drafter gets drafts accepted (so cycles are not all one token)."""
    return models.load_model(REPO / "models" / "bundled" / "tiny-code", dtype=torch.float32)


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_a_crowded_batch_takes_ar_steps_and_resumes_speculating_when_it_thins(bundled, mode):
    """Two requests speculate (the limit is 2); a third joins mid-cycle, so all take AR steps (a
    quadratic request, which it joins while holding a draft, first verifies that draft, alone); when the
    short ones finish, the long one speculates again. Every request's tokens are its AR greedy tokens."""
    tok = bundled.tokenizer
    prompts = [[tok.bos_token_id] + tok.encode(text) for text in ("def add(a, b):\n", "class Stack:\n", "import os\n")]
    lengths = (72, 20, 14)
    engine = Engine(bundled, num_pages=128, speculation_max_batch=2)
    params = [DecodeParams(mode=mode, max_new_tokens=n, block_length=8, trace=True) for n in lengths]
    states = [engine.add_request(f"r{i}", prompts[i], params[i]).state for i in range(2)]
    got: dict[str, list[int]] = {}
    events: list[dict] = []
    holds_a_draft = (lambda s: len(s.verify) > 1) if mode == "quadratic_spec" else (lambda s: True)
    # the first two speculate until a draft has been verified (and, quadratic, the next one is held)
    while not states[0].accepted_lengths or not holds_a_draft(states[0]):
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_tokens)
            events += o.trace if o.request_id == "r0" else []
    states.append(engine.add_request("r2", prompts[2], params[2]).state)
    cycles_before = len(states[0].accepted_lengths)
    while engine.has_work:
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_tokens)
            events += o.trace if o.request_id == "r0" else []
    for i, state in enumerate(states):
        ar = models.generate(bundled, prompts[i], mode="ar", max_new_tokens=lengths[i])
        assert got[f"r{i}"] == ar.tokens, i
        assert state.demoted_steps > 0, i
    assert len(states[0].accepted_lengths) > cycles_before + 1, "the long request never speculated again"
    assert any(n > 1 for n in states[0].accepted_lengths[cycles_before:]), "no draft accepted after the crowd left"
    assert any(e["kind"] == "ar" for e in events)
    if mode == "quadratic_spec":  # a verify that drafts nothing ahead: the held draft, verified alone
        assert any(e["kind"] == "verify" and "next_draft" not in e for e in events)


def test_the_rule_follows_the_limit_or_the_calibrated_costs():
    ar = OptionStats(tpf=1.0, step_s=0.010, per_request_s=0.001)
    spec = OptionStats(tpf=1.5, step_s=0.012, per_request_s=0.004)
    # n requests: speculation (0.012 + 0.004 (n-1)) / 1.5 per token against AR's 0.010 + 0.001 (n-1)
    assert may_speculate("auto", spec, ar, 1) and may_speculate("auto", spec, ar, 2)
    assert not may_speculate("auto", spec, ar, 4) and not may_speculate("auto", spec, ar, 16)
    assert may_speculate("auto", None, ar, 16), "an option without figures is not demoted"
    assert may_speculate("auto", OptionStats(tpf=1.5), ar, 16), "nor one without step costs"
    assert may_speculate(None, spec, ar, 16), "None: never demoted"
    assert may_speculate(3, None, None, 3) and not may_speculate(3, None, None, 4)
    assert may_speculate(1, spec, ar, 1), "a lone request is never demoted for a crowd"


def test_auto_demotes_by_the_priors_and_counts_demoted_steps_as_ar(calibrated_costs_hold):
    model = random_model(seed=5)
    priors = {
        "ar": OptionStats(tpf=1.0, step_s=0.010, per_request_s=0.001),
        "linear_spec@4": OptionStats(tpf=1.5, step_s=0.012, per_request_s=0.004),
    }
    rng = random.Random(3)
    prompts = [[1] + [rng.randrange(4, 64) for _ in range(12)] for _ in range(4)]
    params = DecodeParams(mode="linear_spec", max_new_tokens=16, block_length=4)
    engine = Engine(model, num_pages=128, priors=priors)  # "auto" is the default
    states = [engine.add_request(f"r{i}", p, params).state for i, p in enumerate(prompts)]
    got = _drain(engine)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == models.generate(model, prompt, max_new_tokens=16).tokens
    assert all(s.demoted_steps > 0 for s in states)
    assert engine.stats.options.options["ar"].samples > 0, "the demoted steps were not counted as AR steps"
    assert engine.stats.options.options["linear_spec@4"].tpf == 1.5, "a demoted request's TPF is not its mode's"
    lone = Engine(model, num_pages=128, priors=priors)
    state = lone.add_request("alone", prompts[0], params).state
    _drain(lone)
    # alone it is not demoted by the crowd rule: it speculates until its own cycles are judged (these
    # random weights' drafts do not pay: tests/test_own_record.py), and every AR step it took was a hold
    assert state.accepted_lengths, "a lone request speculates"
    assert state.demoted_steps <= state.record.hold_until


@pytest.mark.parametrize("value", [0, -1, True, "sometimes", 2.5])
def test_bad_speculation_limits_are_refused(value):
    with pytest.raises(ValueError, match="speculation_max_batch"):
        ModelSpec(name="m", path="p", speculation_max_batch=value)
    with pytest.raises(ValueError, match="speculation_max_batch"):
        Engine(random_model(), num_pages=8, speculation_max_batch=value)

"""A speculative request judged by its own cycles: under "auto", a request whose recent cycles predict
less than 0.9x AR's tokens/s (from the option's and AR's step costs) takes AR steps for a while, tries
a cycle again, and waits twice as long each time that cycle does not pay either. Its tokens stay AR's
(temperature 0); a seeded sampled request is never judged (its tokens must not depend on timings)."""

from __future__ import annotations

import random

import pytest

import models
from models.engine import Engine
from models.engine.costs import OptionStats, effective_tpf, record_pays
from models.modes import DecodeParams
from models.modes.base import MAX_HOLD, SpeculationRecord
from tests.conftest import random_model

pytestmark = pytest.mark.usefixtures("calibrated_costs_hold")  # judged against the given costs

SPEC_MODES = ("linear_spec", "quadratic_spec")
BLOCK = 4


def _priors(mode: str, spec_step_s: float) -> dict[str, OptionStats]:
    """Calibrated-looking figures: AR steps cost 10 ms, the option's ``spec_step_s``."""
    return {
        "ar": OptionStats(tpf=1.0, step_s=0.010, per_request_s=0.001),
        f"{mode}@{BLOCK}": OptionStats(tpf=1.5, step_s=spec_step_s, per_request_s=0.002),
    }


@pytest.fixture(scope="module")
def model():
    return random_model(seed=5)  # random weights: drafts are rarely accepted


@pytest.fixture(scope="module")
def prompt():
    rng = random.Random(0)  # its 60 AR tokens end in a stretch the drafts guess (4 tokens a cycle)
    return [1] + [rng.randrange(4, 64) for _ in range(12)]


def _alone(model, prompt, mode, priors, rule="auto", **params):
    engine = Engine(model, num_pages=64, priors=priors, speculation_max_batch=rule)
    params = DecodeParams(mode=mode, max_new_tokens=60, block_length=BLOCK, **params)
    state = engine.add_request("r", prompt, params).state
    while engine.has_work:
        engine.step()
    return state


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_cycles_that_do_not_pay_give_way_to_ar_steps_until_drafts_land(model, prompt, mode):
    """The first cycles accept one token or two: the request holds, tries again, and once it reaches
    the stretch its drafts guess, speculates through it."""
    state = _alone(model, prompt, mode, _priors(mode, spec_step_s=0.016))
    assert state.tokens == models.generate(model, prompt, mode="ar", max_new_tokens=60).tokens
    assert sum(state.accepted_lengths[:3]) / 6 * 0.010 / 0.016 < 0.9, "the first cycles were expected not to pay"
    assert state.demoted_steps > 0, "it never took an AR step"
    assert state.demoted_steps <= state.record.hold_until
    assert state.accepted_lengths[-3:] == [BLOCK] * 3 and state.record.backoff == 1, "it did not speculate again"


def test_ar_steps_of_an_option_count_as_its_observations_and_its_tpf_as_they_cost(model, prompt):
    """The router explores the options with the fewest observations: one whose requests took AR steps
    must not look unseen (it would draw every exploration). And the request's TPF refreshes its
    option's, each AR step it held counted as the share of an option step it costs."""
    engine = Engine(model, num_pages=64, priors=_priors("linear_spec", spec_step_s=0.016))
    state = engine.add_request(
        "r", prompt, DecodeParams(mode="linear_spec", max_new_tokens=60, block_length=BLOCK)
    ).state
    while engine.has_work:
        engine.step()
    figures = engine.stats.options.options
    assert state.demoted_steps > 0
    assert figures["linear_spec@4"].samples >= state.demoted_steps
    assert state.held_steps == state.demoted_steps, "alone, every AR step was a hold"
    own = len(state.tokens) / (state.nfe - state.held_steps + state.held_steps * 0.010 / 0.016)
    assert figures["linear_spec@4"].tpf == pytest.approx(0.8 * 1.5 + 0.2 * own)


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_cycles_that_pay_are_not_held(model, prompt, mode):
    """The same drafts where a cycle's forward is cheap enough (a GPU's block costs about an AR step)."""
    state = _alone(model, prompt, mode, _priors(mode, spec_step_s=0.004))
    assert state.record.tpf * 0.010 / 0.004 >= 0.9
    assert state.demoted_steps == 0 and state.record.backoff == 1


@pytest.mark.parametrize("rule", [None, 4])
def test_only_auto_judges_a_request_by_its_own_cycles(model, prompt, rule):
    state = _alone(model, prompt, "linear_spec", _priors("linear_spec", spec_step_s=0.016), rule=rule)
    assert state.demoted_steps == 0 and state.record.cycles > 0


def test_a_router_exploration_is_not_judged(model, prompt):
    """It runs to refresh its option's figures: AR steps would measure AR."""
    state = _alone(model, prompt, "linear_spec", _priors("linear_spec", spec_step_s=0.016), explored=True)
    assert state.demoted_steps == 0 and state.record.cycles > 0


def test_a_seeded_sampled_request_is_not_judged_but_an_unseeded_one_is(model, prompt):
    priors = _priors("linear_spec", spec_step_s=0.016)
    seeded = _alone(model, prompt, "linear_spec", priors, temperature=1.0, seed=7)
    assert seeded.demoted_steps == 0
    again = _alone(model, prompt, "linear_spec", priors, temperature=1.0, seed=7)
    assert again.tokens == seeded.tokens
    unseeded = _alone(model, prompt, "linear_spec", priors, temperature=1.0)
    assert unseeded.demoted_steps > 0


def test_an_uncalibrated_engine_judges_nothing(model, prompt):
    """Without calibrated costs for the option and AR (live lone step times alone are noisy), and so
    in ``models.generate``, whose engine has no priors: the lossless and distribution tests keep
    exercising drafts."""
    losing = _priors("linear_spec", spec_step_s=0.016)
    for priors in (None, {"ar": losing["ar"]}, {"linear_spec@4": losing["linear_spec@4"]}):
        state = _alone(model, prompt, "linear_spec", priors)
        assert state.demoted_steps == 0 and state.record.cycles > 0
    state = models.generate(model, prompt, mode="linear_spec", max_new_tokens=60, block_length=BLOCK)
    assert state.nfe == 1 + 2 * len(state.accepted_lengths), "models.generate took AR steps"


def test_record_pays_by_both_step_costs():
    spec = OptionStats(tpf=1.0, step_s=0.016)
    assert record_pays(0.5, None, OptionStats(step_s=0.010), 1)
    assert record_pays(0.5, spec, OptionStats(tpf=1.0), 1)
    assert not record_pays(0.5, spec, OptionStats(step_s=0.010), 1)
    assert record_pays(1.5, spec, OptionStats(step_s=0.010), 1)  # 1.5 / 16 ms >= 0.9 / 10 ms


def test_effective_tpf_counts_held_ar_steps_at_their_cost():
    spec, ar = OptionStats(step_s=0.016), OptionStats(step_s=0.010)
    assert effective_tpf(10, 6, 2, spec, ar) == pytest.approx(10 / (4 + 2 * 0.010 / 0.016))
    assert effective_tpf(10, 6, 0, spec, ar) == pytest.approx(10 / 6)
    assert effective_tpf(10, 6, 2, spec, OptionStats()) == pytest.approx(10 / 6), "unknown cost: a whole step"


def test_the_record_holds_doubles_its_wait_and_resets_when_a_cycle_pays():
    record = SpeculationRecord()
    verdict = {"pays": False}

    def pays(tpf: float) -> bool:
        return verdict["pays"]

    assert record.allows(0, pays), "no cycle yet: it may try"
    demoted = 0
    for expected_wait in (1, 2, 4, 8):
        record.observe(tokens=1, forwards=2)
        assert not record.allows(demoted, pays)
        assert record.hold_until == demoted + expected_wait
        assert not record.allows(demoted + expected_wait - 1, pays), "it tried before its wait was over"
        demoted += expected_wait
        assert record.allows(demoted, pays), "nothing new to judge after the wait: it tries a cycle"
    for _ in range(10):
        record.observe(tokens=1, forwards=2)
        record.allows(record.hold_until, pays)
    assert record.backoff == MAX_HOLD
    verdict["pays"] = True
    record.observe(tokens=9, forwards=2)
    assert record.allows(record.hold_until, pays) and record.backoff == 1
    assert record.tokens == pytest.approx(0.5 * 1 + 0.5 * 9)

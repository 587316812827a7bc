"""The latency-tier router as pure functions on synthetic replica statistics and calibrated figures."""

from __future__ import annotations

import math
import random

import pytest

from deployments.router import (
    EXPLORE_SLOWDOWN,
    Candidate,
    Decision,
    ReplicaStats,
    TierTarget,
    best,
    evaluate,
    explore,
    predict,
)
from models.engine.costs import OptionStats

# calibrated figures shaped like a model whose drafts are accepted: a lone AR step 10 ms, a block
# step a little dearer; each further request adds little to AR's step and a lot to a block's
CALIBRATED = {
    "ar": OptionStats(tpf=1.0, step_s=0.010, per_request_s=0.0002),
    "linear_spec@8": OptionStats(tpf=2.2, step_s=0.012, per_request_s=0.0016),
    "linear_spec@32": OptionStats(tpf=2.6, step_s=0.016, per_request_s=0.0064),
    "quadratic_spec@8": OptionStats(tpf=2.8, step_s=0.014, per_request_s=0.0032),
    "diffusion@8": OptionStats(tpf=1.1, step_s=0.012, per_request_s=0.0016),
}


def choose(target: TierTarget, candidates: list[Candidate], prompt_tokens: int) -> Decision:
    return best(evaluate(target, candidates, prompt_tokens))


def cand(name="8b", size=8e9, running=0, waiting=0, fixed=0.02, per_token=1e-4, options=None, figures=None):
    stats = ReplicaStats(
        fixed_step_s=fixed,
        per_token_s=per_token,
        running=running,
        waiting=waiting,
        options=dict(CALIBRATED if figures is None else figures),
    )
    return Candidate(name, size, stats, tuple(options or CALIBRATED))


def test_low_load_favours_self_speculation():
    decision = choose(TierTarget(), [cand(running=0)], prompt_tokens=100)
    assert (decision.mode, decision.block_length) == ("quadratic_spec", 8)


def test_high_concurrency_favours_ar():
    decision = choose(TierTarget(), [cand(running=64)], prompt_tokens=100)
    assert decision.option == "ar" and decision.block_length is None


def test_decision_flips_where_the_calibrated_costs_say():
    # with n requests in flight, linear_spec@8 beats AR while (12 + 1.6 n) / 2.2 < 10 + 0.2 n (ms),
    # i.e. n < 10 / 1.16, about 8.6
    options = ("ar", "linear_spec@8")
    below = choose(TierTarget(), [cand(running=8, options=options)], 10)
    above = choose(TierTarget(), [cand(running=9, options=options)], 10)
    assert (below.option, above.option) == ("linear_spec@8", "ar")


def test_block_length_is_chosen_with_the_mode():
    # alone, the longer block's higher TPF pays for its dearer step; with company it does not
    options = ("linear_spec@8", "linear_spec@32")
    figures = {
        "linear_spec@8": OptionStats(tpf=2.0, step_s=0.012, per_request_s=0.0016),
        "linear_spec@32": OptionStats(tpf=3.0, step_s=0.016, per_request_s=0.0064),
    }
    alone = choose(TierTarget(), [cand(running=0, options=options, figures=figures)], 10)
    crowded = choose(TierTarget(), [cand(running=4, options=options, figures=figures)], 10)
    assert (alone.block_length, crowded.block_length) == (32, 8)


def test_uncalibrated_options_fall_back_on_the_live_fit():
    # no figures: step = fixed + per_token * query tokens * requests, TPF 1; quadratic at block 8
    # with one branch puts 16 query tokens in a forward, so it can only lose to AR
    c = cand(options=("ar", "quadratic_spec@8"), figures={}, running=3)
    assert predict(c, "ar", 10)[1] == pytest.approx(0.02 + 1e-4 * 4)  # 3 running and this one
    assert predict(c, "quadratic_spec@8", 10)[1] == pytest.approx(0.02 + 1e-4 * 16 * 4)
    assert choose(TierTarget(), [c], 10).option == "ar"


def test_live_figures_override_the_fallback_per_option():
    # one option measured, the other not: the measured TPF lets speculation win at low load
    figures = {"linear_spec@8": OptionStats(tpf=3.0, step_s=0.03, per_request_s=None)}
    c = cand(options=("ar", "linear_spec@8"), figures=figures)
    assert choose(TierTarget(), [c], 10).option == "linear_spec@8"


def test_largest_model_that_meets_the_tier():
    big = cand("14b", 14e9, figures={"ar": OptionStats(tpf=1.0, step_s=0.06, per_request_s=1e-3)}, options=("ar",))
    small = cand("3b", 3e9, figures={"ar": OptionStats(tpf=1.0, step_s=0.010, per_request_s=1e-3)}, options=("ar",))
    loose = choose(TierTarget(ttft=5.0, tpot=0.1), [small, big], prompt_tokens=200)
    assert loose.model == "14b" and loose.meets_targets
    tight = choose(TierTarget(ttft=5.0, tpot=0.012), [small, big], prompt_tokens=200)
    assert tight.model == "3b" and tight.meets_targets


def test_nothing_meets_targets_falls_back_to_fastest():
    slow = {
        key: OptionStats(tpf=s.tpf, step_s=s.step_s * 5, per_request_s=s.per_request_s) for key, s in CALIBRATED.items()
    }
    decision = choose(TierTarget(ttft=1e-6, tpot=1e-6), [cand("3b", 3e9), cand("8b", 8e9, figures=slow)], 100)
    assert not decision.meets_targets and decision.model == "3b"


def test_queue_raises_predicted_ttft():
    idle = predict(cand(waiting=0), "ar", 500)[0]
    queued = predict(cand(waiting=10), "ar", 500)[0]
    assert queued > idle


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError):
        choose(TierTarget(), [], 10)


def test_exploration_visits_the_least_measured_option_on_the_set_fraction():
    options = evaluate(TierTarget(), [cand(running=0)], 10)
    chosen = min(options, key=lambda d: d.tpot)
    samples = {"ar": 50, "linear_spec@8": 3, "linear_spec@32": 40, "quadratic_spec@8": 900, "diffusion@8": 3}
    rng = random.Random(7)
    assert explore(chosen, options, samples, 0.0, rng) is chosen
    picks = [explore(chosen, options, samples, 1.0, rng) for _ in range(200)]
    assert all(p.explored and p.option != chosen.option for p in picks)
    assert {p.option for p in picks} == {"linear_spec@8", "diffusion@8"}  # the two least measured, both visited
    share = sum(explore(chosen, options, samples, 0.1, rng).explored for _ in range(4000)) / 4000
    assert share == pytest.approx(0.1, abs=0.025)


def test_exploration_stays_within_the_tier_when_the_choice_meets_it():
    # a tight TPOT target that only the quadratic option meets: nothing else is explored
    target = TierTarget(tpot=0.0052)
    options = evaluate(target, [cand(running=0)], 10)
    chosen = min(options, key=lambda d: d.tpot)
    assert chosen.meets_targets and [d.option for d in options if d.meets_targets] == [chosen.option]
    assert explore(chosen, options, {}, 1.0, random.Random(0)) is chosen


def test_predict_uses_the_per_request_cost_of_the_option():
    c = cand(running=5)
    tpot = predict(c, "linear_spec@32", 10)[1]
    assert tpot == pytest.approx((0.016 + 0.0064 * 5) / 2.6)
    assert math.isfinite(predict(c, "diffusion@8", 10)[0])


def test_affinity_key_is_the_prompts_shareable_leading_pages():
    """Prompts that start with the same (at most four) full pages share a key; a prompt whose pages the
    prefix cache could not share (its last token always computed) has none."""
    from deployments.affinity import affinity_key

    system = list(range(64))
    assert affinity_key(system + [1, 2], 16) == affinity_key(system + [7] * 30, 16) is not None
    assert affinity_key(list(range(33)), 16) == affinity_key(list(range(40)), 16)  # two pages each
    assert affinity_key(list(range(33)), 16) != affinity_key(list(range(32)), 16)  # 32 tokens: one page shareable
    assert affinity_key(list(range(16)), 16) is None and affinity_key([], 16) is None
    assert affinity_key([5] + system, 16) != affinity_key(system + [5], 16)


def test_exploration_at_high_load_skips_options_predicted_far_slower():
    # at 64 requests in flight the 32-token options would slow every request batched with them
    options = evaluate(TierTarget(), [cand(running=64)], 10)
    chosen = best(options)
    far = [d.option for d in options if d.tpot > EXPLORE_SLOWDOWN * chosen.tpot]
    assert chosen.option == "ar" and far  # the bound has something to exclude
    picks = {explore(chosen, options, {}, 1.0, random.Random(i)).option for i in range(200)}
    assert picks and not picks & set(far) and chosen.option not in picks


def test_where_the_replica_demotes_crowded_speculation_it_is_predicted_as_ar_and_chosen_on_ties():
    """With ``speculation_max_batch`` the replica's rule is the router's: a speculative option that
    would take AR steps at this load is predicted as AR, and of the options tied with AR the one
    fastest alone wins (it gains when the batch thins); at low load speculation wins outright."""
    crowded = cand(running=64)
    crowded.stats.speculation_max_batch = "auto"
    decisions = {d.option: d for d in evaluate(TierTarget(), [crowded], 100)}
    assert decisions["linear_spec@8"].tpot == decisions["ar"].tpot == decisions["quadratic_spec@8"].tpot
    assert best(list(decisions.values())).option == "quadratic_spec@8"  # the fastest alone
    assert decisions["diffusion@8"].tpot > decisions["ar"].tpot, "diffusion never takes AR steps"
    limited = cand(running=3)
    limited.stats.speculation_max_batch = 4  # 3 in flight and this one: 4, not above the limit
    assert predict(limited, "linear_spec@8", 100) != predict(limited, "ar", 100)
    limited.stats.running = 4
    assert predict(limited, "linear_spec@8", 100) == predict(limited, "ar", 100)
    idle = cand(running=0)
    idle.stats.speculation_max_batch = "auto"
    assert choose(TierTarget(), [idle], 100).option == "quadratic_spec@8"


def test_exploration_skips_options_the_crowd_would_make_take_ar_steps():
    """Such a request measures nothing of its option (AR steps; a crowd's TPF is not the option's)."""
    crowded = cand(running=64)
    crowded.stats.speculation_max_batch = "auto"
    options = evaluate(TierTarget(), [crowded], 10)
    chosen = best(options)
    out = {d.option for d in options if d.crowded_out}
    assert out == {"linear_spec@8", "linear_spec@32", "quadratic_spec@8"} and chosen.option in out  # tied with AR
    picks = {explore(chosen, options, {}, 1.0, random.Random(i)).option for i in range(200)}
    assert picks == {"ar"}  # the one option not crowded out (diffusion is far slower here)
    idle = cand(running=0)
    idle.stats.speculation_max_batch = "auto"
    options = evaluate(TierTarget(), [idle], 10)
    assert not any(d.crowded_out for d in options)
    picks = {explore(best(options), options, {}, 1.0, random.Random(i)).option for i in range(200)}
    assert {"linear_spec@8", "linear_spec@32"} <= picks

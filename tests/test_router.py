"""The latency-tier router as a pure function on synthetic replica statistics."""

from __future__ import annotations

import math

import pytest

from deployments.router import Candidate, ReplicaStats, TierTarget, choose, predict

# a model whose step costs 20 ms plus 0.1 ms per query token; speculation emits 2.5 tokens/forward
TPF = {"ar": 1.0, "linear_spec": 1.25, "quadratic_spec": 2.5, "diffusion": 1.5}


def cand(name="8b", size=8e9, running=0, waiting=0, fixed=0.02, per_token=1e-4, modes=None):
    stats = ReplicaStats(fixed_step_s=fixed, per_token_s=per_token, running=running, waiting=waiting, tpf=dict(TPF))
    return Candidate(name, size, stats, block_length=8, modes=modes or ("ar", "linear_spec", "quadratic_spec"))


def test_low_load_favours_self_speculation():
    decision = choose(TierTarget(), [cand(running=0)], prompt_tokens=100)
    assert decision.mode == "quadratic_spec"


def test_high_concurrency_favours_ar():
    decision = choose(TierTarget(), [cand(running=64)], prompt_tokens=100)
    assert decision.mode == "ar"


def test_decision_flips_where_the_cost_model_says():
    # with n requests in flight, quadratic (16 tokens per forward at L=8 with 1 branch, TPF 2.5)
    # beats AR while (f + p n 16) / 2.5 < f + p n, i.e. n < 1.5 f / (p (16 - 2.5))
    f, p = 0.02, 1e-4
    flip = 1.5 * f / (p * (16 - 2.5))  # about 22 requests
    modes = ("ar", "quadratic_spec")
    below = choose(TierTarget(), [cand(running=math.floor(flip) - 1, modes=modes)], 10)
    above = choose(TierTarget(), [cand(running=math.ceil(flip), modes=modes)], 10)
    assert (below.mode, above.mode) == ("quadratic_spec", "ar")


def test_largest_model_that_meets_the_tier():
    big = cand("14b", 14e9, fixed=0.06)
    small = cand("3b", 3e9, fixed=0.015)
    loose = choose(TierTarget(ttft=5.0, tpot=0.1), [small, big], prompt_tokens=200)
    assert loose.model == "14b" and loose.meets_targets
    tight = choose(TierTarget(ttft=5.0, tpot=0.012), [small, big], prompt_tokens=200)
    assert tight.model == "3b" and tight.meets_targets


def test_nothing_meets_targets_falls_back_to_fastest():
    decision = choose(TierTarget(ttft=1e-6, tpot=1e-6), [cand("3b", 3e9), cand("8b", 8e9, fixed=0.05)], 100)
    assert not decision.meets_targets and decision.model == "3b"


def test_queue_raises_predicted_ttft():
    idle = predict(cand(waiting=0), "ar", 500)[0]
    queued = predict(cand(waiting=10), "ar", 500)[0]
    assert queued > idle


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError):
        choose(TierTarget(), [], 10)

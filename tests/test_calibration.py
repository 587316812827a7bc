"""Router figures: calibration on a real checkpoint, the file replicas load, live refresh in the engine,
and aggregation over replicas."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

import models
from deployments.cli import main
from deployments.stats_board import StatsBoard, merge_stats
from models.calibration import calibrate, device_key, load_priors, options_for, save_calibration
from models.engine import Engine
from models.engine.costs import FIT_WINDOW, CostFit, OptionCosts, OptionStats, option_key, request_option, split_option
from models.modes import DecodeParams


def test_option_keys_round_trip_and_non_default_requests_do_not_count():
    assert option_key("ar", 32) == "ar" and split_option("ar") == ("ar", None)
    assert split_option(option_key("quadratic_spec", 8)) == ("quadratic_spec", 8)
    assert request_option(DecodeParams(mode="linear_spec"), 32) == "linear_spec@32"
    assert request_option(DecodeParams(mode="diffusion", block_length=8), 32) == "diffusion@8"
    assert request_option(DecodeParams(mode="diffusion", threshold=0.5), 32) is None
    assert request_option(DecodeParams(mode="quadratic_spec", branches=4), 32) is None


def test_live_steps_rescale_every_calibrated_option_alike():
    priors = {
        "ar": OptionStats(tpf=1.0, step_s=0.010, per_request_s=0.001),
        "linear_spec@8": OptionStats(tpf=2.0, step_s=0.020, per_request_s=0.004),
    }
    costs = OptionCosts(priors, ema=0.5)
    assert costs.options["ar"].samples == 0  # priors are not live observations
    costs.observe_step("ar", 5, 0.028)  # predicted 10 + 4 x 1 ms: twice as slow as calibrated
    assert (costs.scale, costs.overhead) == (pytest.approx(2.0), 0.0) and costs.options["ar"].samples == 1
    spec = costs.snapshot()["linear_spec@8"]  # not visited, but the device is slower for it too
    assert (spec["step_s"], spec["per_request_s"], spec["samples"]) == (pytest.approx(0.040), pytest.approx(0.008), 0)
    costs.observe_finished("linear_spec@8", 3.0)
    assert (
        costs.options["linear_spec@8"].tpf == pytest.approx(2.5) and priors["linear_spec@8"].tpf == 2.0
    )  # priors untouched


def test_a_fixed_cost_per_request_is_told_apart_from_a_slower_device():
    """Serving adds about the same time to every request of every step (delivering its output): once
    live steps of options with different calibrated costs are seen, the fit charges AR's cheap steps
    that time rather than tripling every option, and speculation is predicted to pay again; the time
    is charged per request, so a crowd's steps do not make a lone request's dearest option look best."""
    priors = {
        "ar": OptionStats(tpf=1.0, step_s=0.0005, per_request_s=0.0001),
        "linear_spec@8": OptionStats(tpf=2.4, step_s=0.00125, per_request_s=0.0006),
        "quadratic_spec@16": OptionStats(tpf=3.4, step_s=0.0026, per_request_s=0.002),
    }
    costs = OptionCosts(priors)
    for _ in range(20):
        costs.observe_step("ar", 1, 0.0005 + 0.001)
    assert (costs.scale, costs.overhead) == (pytest.approx(3.0), 0.0)  # one option: only a factor is known
    ar, spec = costs.figures("ar"), costs.figures("linear_spec@8")
    assert spec.step_cost(1) / spec.tpf > ar.step_cost(1)  # as a factor, speculation looks slower than AR
    for _ in range(5):
        costs.observe_step("linear_spec@8", 1, 0.00125 + 0.001)
        costs.observe_step("linear_spec@8", 2, 0.00185 + 0.002)
    assert (costs.scale, costs.overhead) == (pytest.approx(1.0), pytest.approx(0.001))
    ar, spec, quadratic = (costs.figures(k) for k in ("ar", "linear_spec@8", "quadratic_spec@16"))
    assert ar.step_s == pytest.approx(0.0015) and ar.per_request_s == pytest.approx(0.0011)
    assert spec.step_cost(1) / spec.tpf < ar.step_cost(1)
    # a crowd of 16 whose steps each cost 0.3 ms per request more than calibrated
    for _ in range(FIT_WINDOW):
        for key in ("ar", "linear_spec@8"):
            costs.observe_step(key, 16, priors[key].step_cost(16) + 16 * 0.0003)
    assert (costs.scale, costs.overhead) == (pytest.approx(1.0), pytest.approx(0.0003))
    spec, quadratic = costs.figures("linear_spec@8"), costs.figures("quadratic_spec@16")
    assert quadratic.step_cost(1) / quadratic.tpf > spec.step_cost(1) / spec.tpf
    for points, ratio in (([(1.0, 1, 3.0), (2.0, 1, 1.0)], 4.0 / 3.0), ([(1.0, 1, 0.5), (2.0, 1, 2.0)], 2.5 / 3.0)):
        fit = CostFit()
        for point in points:
            fit.add(*point)
        assert fit.solve() == (pytest.approx(ratio), 0.0)  # no positive factor; a negative overhead
    fit = CostFit(size=2)  # steps leave the window: only the last two count
    for point in ((1.0, 1, 9.0), (1.0, 1, 2.0), (2.0, 1, 3.0)):
        fit.add(*point)
    assert fit.solve() == (pytest.approx(1.0), pytest.approx(1.0))


def test_uncalibrated_options_learn_from_lone_steps():
    costs = OptionCosts(ema=0.5)
    costs.observe_step("linear_spec@8", 3, 0.05)  # no per-request cost known: says nothing of a lone step
    assert costs.options["linear_spec@8"].step_s is None and costs.options["linear_spec@8"].samples == 0
    costs.observe_step("linear_spec@8", 1, 0.02)
    costs.observe_finished("linear_spec@8", 2.5)
    assert costs.snapshot()["linear_spec@8"] == {"tpf": 2.5, "step_s": 0.02, "per_request_s": None, "samples": 2}


@pytest.fixture(scope="module")
def calibrated(fixture_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(fixture_path, folder)
    return folder


def test_calibrate_measures_every_option(calibrated):
    model = models.load_model(calibrated)
    figures = calibrate(model, blocks=(4,), prompts=2, max_new_tokens=8, batch=3)
    assert list(figures) == options_for((4,)) == ["ar", "diffusion@4", "linear_spec@4", "quadratic_spec@4"]
    assert figures["ar"].tpf == 1.0  # one token per AR forward, exactly
    for stats in figures.values():
        assert stats.tpf > 0 and stats.step_s > 0 and stats.per_request_s >= 0


def test_cli_writes_the_entry_a_replica_on_this_device_loads(calibrated):
    code = main(["calibrate", "--model", str(calibrated), "--blocks", "4", "--prompts", "1", "--max-new-tokens", "6"])
    assert code == 0
    model = models.load_model(calibrated)
    key = device_key("cpu", 1, model.dtype)
    priors = load_priors(calibrated, key)
    assert set(priors) == set(options_for((4,))) and all(p.samples == 0 for p in priors.values())
    assert load_priors(calibrated, device_key("cpu", 7, model.dtype)) is None  # other threads: other device
    # another device's entry is kept beside this one
    save_calibration(calibrated, "cuda:Some GPU:bfloat16", {"ar": OptionStats(1.0, 0.001, 1e-5)})
    data = json.loads((calibrated / "triserve_calibration.json").read_text())
    assert set(data["devices"]) == {key, "cuda:Some GPU:bfloat16"}
    # the engine starts from them and refreshes them with its own steps
    engine = Engine(model, num_pages=32, page_size=8, priors=priors)
    assert engine.stats.options.options["ar"].step_s == priors["ar"].step_s
    engine.add_request("r", [1, 5, 9], DecodeParams(mode="ar", max_new_tokens=6))
    while engine.has_work:
        engine.step()
    assert engine.stats.options.options["ar"].samples > 1 and engine.stats.options.scale != 1.0


def test_bad_calibration_arguments_are_refused(calibrated):
    model = models.load_model(calibrated, dtype=torch.float32)
    with pytest.raises(ValueError):
        calibrate(model, prompts=0)
    with pytest.raises(ValueError):
        calibrate(model, blocks=(1,))
    with pytest.raises(ValueError, match="rounds"):
        calibrate(model, rounds=0)


def test_merge_sums_load_and_weights_figures_by_observations():
    a = {
        "running": 3,
        "waiting": 1,
        "used_pages": 10,
        "pages": 100,
        "fixed_step_s": 0.01,
        "per_token_s": None,
        "options": {"ar": {"tpf": 1.0, "step_s": 0.010, "per_request_s": 0.001, "samples": 9}},
    }
    b = {
        "running": 5,
        "waiting": 0,
        "used_pages": 30,
        "pages": 100,
        "fixed_step_s": 0.03,
        "per_token_s": 1e-4,
        "options": {
            "ar": {"tpf": 1.0, "step_s": 0.020, "per_request_s": None, "samples": 0},
            "linear_spec@8": {"tpf": 2.0, "step_s": 0.02, "per_request_s": 0.002, "samples": 4},
        },
    }
    merged = merge_stats([a, b])
    assert (merged["replicas"], merged["running"], merged["waiting"]) == (2, 8, 1)
    assert merged["pool_usage"] == pytest.approx(0.2) and merged["fixed_step_s"] == pytest.approx(0.02)
    assert merged["per_token_s"] == pytest.approx(1e-4)
    ar = merged["options"]["ar"]
    assert ar["step_s"] == pytest.approx((0.010 * 10 + 0.020 * 1) / 11) and ar["per_request_s"] == 0.001
    assert ar["samples"] == 9 and merged["options"]["linear_spec@8"]["tpf"] == 2.0


def test_board_forgets_replicas_that_stop_reporting():
    board = StatsBoard(stale_after_s=0.2)
    board.report("a", {"running": 2, "options": {}})
    assert board.aggregate("b", {"running": 1, "options": {}})["running"] == 3
    time.sleep(0.3)
    merged = board.aggregate("b", {"running": 4, "options": {}})
    assert (merged["replicas"], merged["running"]) == (1, 4)

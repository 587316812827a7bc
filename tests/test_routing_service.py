"""Routing in the Ray-free OpenAI service over a real engine: calibrated priors decide the option, a
burst of requests turns the choice to AR, exploration runs another option and refreshes its figures."""

from __future__ import annotations

import asyncio
import gc
import random
import shutil

import pytest

import models
from deployments.config import parse_config
from deployments.openai_api import STATS_TTL_S, OpenAIService
from deployments.protocol import CompletionRequest
from deployments.served import ServedModel
from deployments.stats_board import merge_stats, replica_stats
from models.calibration import device_key, save_calibration
from models.engine import AsyncEngine, Engine
from models.engine.costs import OptionStats
from models.engine.host import score_top
from models.vlm import read_config

# figures under which linear_spec at block 4 wins alone (4 ms a token against AR's 10) and AR wins
# from three requests in flight on: (12 + 8 n) / 3 > 10 + 0.5 n once n > 2.8
FIGURES = {
    "ar": OptionStats(tpf=1.0, step_s=0.010, per_request_s=0.0005),
    "linear_spec@4": OptionStats(tpf=3.0, step_s=0.012, per_request_s=0.008),
    "quadratic_spec@4": OptionStats(tpf=1.5, step_s=0.030, per_request_s=0.010),
    "diffusion@4": OptionStats(tpf=1.0, step_s=0.012, per_request_s=0.004),
}


class EngineBackend:
    """A model reached in-process: the engine a replica would run, its stats as a board would merge them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = AsyncEngine(engine)

    async def generate(self, request):
        params = models.modes.DecodeParams(**request["params"])
        async for out in self.engine.generate(request["request_id"], request["prompt"], params):
            yield out.__dict__

    async def score(self, token_ids, top):
        return await self.engine.call(score_top, token_ids, top)

    async def stats(self):
        return merge_stats([replica_stats(self.engine.engine.stats, 512)])


def make_service(fixture_path, tmp_path, figures: dict[str, OptionStats], **spec) -> OpenAIService:
    folder = tmp_path / "model"
    shutil.copytree(fixture_path, folder)
    model = models.load_model(folder)
    save_calibration(folder, device_key("cpu", 1, model.dtype), figures)
    from models.calibration import load_priors

    priors = load_priors(folder, device_key("cpu", 1, model.dtype))
    config = parse_config({"models": [{"name": "m", "path": str(folder), **spec}], "router": {"explore": 0.0}})
    limit = config.models[0].speculation_max_batch
    engine = Engine(model, num_pages=128, page_size=16, priors=priors, speculation_max_batch=limit)
    text_config, _ = read_config(folder)
    served = ServedModel(config.models[0], text_config, model.tokenizer, EngineBackend(engine))
    return OpenAIService(config, {"m": served}, rng=random.Random(3))


@pytest.fixture
def service(fixture_path, tmp_path):
    return make_service(fixture_path, tmp_path, FIGURES)


def request(**extra):
    return CompletionRequest.model_validate({"model": "m", "prompt": "def f(x):", "max_tokens": 8, **extra})


def test_a_burst_turns_the_choice_from_speculation_to_ar(fixture_path, tmp_path):
    """On a replica whose speculative requests never step aside (``speculation_max_batch: null``)."""
    service = make_service(fixture_path, tmp_path, FIGURES, speculation_max_batch=None)

    async def main():
        held = [await service.prepare(request(), "completion") for _ in range(8)]
        return [(p.params.mode, p.params.block_length) for p in held]

    chosen = asyncio.run(main())
    assert chosen[0] == ("linear_spec", 4) and chosen[-1] == ("ar", None), chosen
    gc.collect()
    assert service.in_flight["m"] == 0  # every prepared request released its place

    def next_mode() -> str:
        return asyncio.run(service.prepare(request(), "completion")).params.mode

    # the burst is over, but within the load window the router plans for its peak: the next burst
    # does not start with speculation
    assert service.recent_load("m") == 8 and next_mode() == "ar"
    service.config.load_window_s = 0.0  # a window of nothing: the instantaneous count alone
    gc.collect()
    assert service.recent_load("m") == 0 and next_mode() == "linear_spec"


def test_a_burst_keeps_speculation_where_crowded_requests_take_ar_steps(service):
    """Under the default ``speculation_max_batch: auto`` a crowded speculative request takes AR steps,
    so the router predicts it as AR under load and, on the tie, keeps the option fastest alone."""

    async def main():
        held = [await service.prepare(request(), "completion") for _ in range(8)]
        return {(p.params.mode, p.params.block_length) for p in held}

    assert asyncio.run(main()) == {("linear_spec", 4)}


def test_auto_never_trades_the_answer_for_speed(fixture_path, tmp_path):
    # diffusion predicted eight times faster than anything else: auto still keeps to the modes whose
    # output is AR's, exploration included; asked for by name, diffusion is what runs
    fast_diffusion = {**FIGURES, "diffusion@4": OptionStats(tpf=8.0, step_s=0.004, per_request_s=0.001)}
    service = make_service(fixture_path, tmp_path, fast_diffusion)

    async def modes(**extra):
        return [(await service.prepare(request(**extra), "completion")).params.mode for _ in range(6)]

    assert asyncio.run(modes()) == ["linear_spec"] * 6
    service.config.explore = 1.0
    assert "diffusion" not in asyncio.run(modes())
    assert asyncio.run(modes(decoding={"mode": "diffusion"})) == ["diffusion"] * 6


def test_a_fixed_block_length_limits_the_options(service):
    prep = asyncio.run(service.prepare(request(decoding={"block_length": 8}), "completion"))
    assert prep.params.block_length in (8, None)  # AR, or a mode at the asked block


def test_exploration_runs_another_option_and_refreshes_its_figures(service):
    service.config.explore = 1.0

    async def main():
        # greedy: at the default temperature a sampled first token can be EOS, leaving no text
        prep = await service.prepare(request(max_tokens=12, temperature=0), "completion")
        text = "".join([delta async for delta, _ in service.run(prep)])
        return prep, text

    prep, text = asyncio.run(main())
    assert prep.decision.explored and prep.decision.option != "linear_spec@4"
    assert prep.params.explored, "the engine is not told to run the explored option as asked"
    explored = service.models["m"].backend.engine.engine.stats.options.options[prep.decision.option]
    assert explored.samples > 0 and text  # the run counted towards the explored option's figures


def test_requests_share_one_stats_call(service):
    """A stats call crosses two actors on a replica (milliseconds under load): requests that arrive
    while the figures are stale wait for one call, not one each."""
    backend = service.models["m"].backend
    real = backend.stats
    calls = []

    async def main():
        gate = asyncio.Event()

        async def gated_stats():
            calls.append(None)
            await gate.wait()
            return await real()

        backend.stats = gated_stats
        for round_ in (1, 2):
            burst = [asyncio.ensure_future(service.prepare(request(), "completion")) for _ in range(16)]
            await asyncio.sleep(0.05)
            assert len(calls) == round_ and not any(t.done() for t in burst), "the requests wait for one call"
            gate.set()
            await asyncio.gather(*burst)
            assert len(calls) == round_ and "m" not in service._refreshing
            gate.clear()
            stamp, figures = service._stats["m"]
            service._stats["m"] = (stamp - STATS_TTL_S, figures)  # stale: the next burst refreshes them
        gate.set()
        await service.prepare(request(), "completion")
        assert len(calls) == 3

    asyncio.run(main())

"""The asyncio drivers (engine on a thread, engine in its own process): streaming, cancellation when
the consumer leaves, calls between steps, and the health checks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

import pytest

import models
from deployments.config import ModelSpec
from models.engine import AsyncEngine, Engine
from models.engine.engine import StepOutput
from models.engine.engine_process import STATS_INTERVAL_S, ProcessEngine, stats_due
from models.engine.host import EngineSettings, score_top
from models.generate import score_with_top
from models.loading import save_model
from models.modes import DecodeParams
from tests.conftest import random_model


def test_concurrent_streams_match_generate():
    model = random_model(seed=21)
    driver = AsyncEngine(Engine(model, num_pages=64, page_size=8))
    prompts = [[1, 4 + i, 9, 11] for i in range(6)]
    modes = ["ar", "linear_spec", "quadratic_spec", "diffusion", "ar", "linear_spec"]

    async def one(i):
        tokens = []
        params = DecodeParams(mode=modes[i], max_new_tokens=10, block_length=4)
        async for out in driver.generate(f"r{i}", prompts[i], params):
            tokens.extend(out.new_tokens)
        return tokens

    async def main():
        return await asyncio.gather(*(one(i) for i in range(6)))

    results = asyncio.run(main())
    for i, tokens in enumerate(results):
        assert tokens == models.generate(model, prompts[i], mode=modes[i], max_new_tokens=10, block_length=4).tokens


def test_leaving_consumer_cancels_and_frees_pages():
    model = random_model(seed=22, eos_token_id=None)
    engine = Engine(model, num_pages=64, page_size=8)
    driver = AsyncEngine(engine)

    async def main():
        stream = driver.generate("gone", [1, 5, 6], DecodeParams(mode="ar", max_new_tokens=300))
        async for _ in stream:
            if engine.kv.used_pages:
                break
        await stream.aclose()
        for _ in range(100):
            if not engine.has_work and engine.kv.used_pages == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(main())


def test_bad_request_raises_before_queueing():
    driver = AsyncEngine(Engine(random_model(seed=23), num_pages=4, page_size=8))

    async def main():
        async for _ in driver.generate("big", [1] * 20, DecodeParams(mode="ar", max_new_tokens=40)):
            pass

    with pytest.raises(ValueError, match="pool holds 32"):
        asyncio.run(main())
    assert not driver.engine.has_work


def test_check_health_fails_when_the_loop_is_stuck(tmp_path):
    from deployments.server import ModelServer

    save_model(random_model(seed=24), tmp_path / "m")
    server = ModelServer(asdict(ModelSpec(name="m", path=str(tmp_path / "m"), num_pages=16, engine_process=False)))
    server.check_health()  # idle: healthy
    assert asyncio.run(server.stats())["replicas"] == 1  # outside Serve: its own stats, no board
    engine = server.engine.engine
    engine.add_request("r", [1, 2, 3], DecodeParams(mode="ar", max_new_tokens=4))
    server.engine.last_progress = time.monotonic() - 3600  # work queued, no step for an hour
    with pytest.raises(RuntimeError, match="no progress"):
        server.check_health()


def test_busy_streams_send_fewer_larger_messages_a_lone_one_at_its_own_interval():
    model = random_model(seed=25, eos_token_id=None)
    driver = AsyncEngine(Engine(model, num_pages=64, page_size=8), stream_interval_s=0.2)

    async def one(i):
        messages, tokens = 0, []
        async for out in driver.generate(f"r{i}", [1, 4 + i, 9], DecodeParams(mode="ar", max_new_tokens=30)):
            messages += 1
            tokens += out.new_tokens
        return messages, tokens

    async def together():
        return await asyncio.gather(*(one(i) for i in range(3)))

    for i, (messages, tokens) in enumerate(asyncio.run(together())):
        assert tokens == models.generate(model, [1, 4 + i, 9], max_new_tokens=30).tokens
        assert messages < 15  # outputs of several steps merged into each message
    # a lone stream with no interval of its own is not held back: one message per step. Steps are slowed
    # to 10 ms here so that the consumer always keeps up (one that lags gets the missed steps merged,
    # whatever the interval)
    engine_step = driver.engine.step

    def slow_step():
        outputs = engine_step()
        time.sleep(0.01)
        return outputs

    driver.engine.step = slow_step
    messages, tokens = asyncio.run(one(7))
    assert messages == 30 and tokens == models.generate(model, [1, 11, 9], max_new_tokens=30).tokens
    driver.lone_stream_interval_s = 0.05  # its own interval: about one message per 5 steps, the same tokens
    messages, tokens = asyncio.run(one(7))
    assert 3 <= messages <= 12 and tokens == models.generate(model, [1, 11, 9], max_new_tokens=30).tokens


def test_engine_process_streams_scores_refuses_and_cancels(tmp_path):
    model = random_model(seed=26, eos_token_id=None)
    save_model(model, tmp_path / "m")
    settings = EngineSettings(str(tmp_path / "m"), dtype="float32", engine={"num_pages": 16, "page_size": 8})
    driver = ProcessEngine(settings, stream_interval_s=0.05)
    modes = ["ar", "linear_spec", "quadratic_spec", "diffusion"]

    async def one(i):
        tokens = []
        params = DecodeParams(mode=modes[i], max_new_tokens=10, block_length=4)
        async for out in driver.generate(f"r{i}", [1, 4 + i, 9, 11], params):
            tokens.extend(out.new_tokens)
        return tokens

    async def refused():
        async for _ in driver.generate("big", [1] * 20, DecodeParams(mode="ar", max_new_tokens=200)):
            pass

    async def cancelled():
        stream = driver.generate("gone", [1, 5, 6], DecodeParams(mode="ar", max_new_tokens=100))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):  # the engine process drops it and frees its pages
            if driver.stats.running == 0 and driver.stats.pool_used_pages == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    async def main():
        streamed = await asyncio.gather(*(one(i) for i in range(4)))
        return streamed, await driver.call(score_top, [1, 4, 9, 11, 12], 2)

    try:
        streamed, scores = asyncio.run(main())
        for i, tokens in enumerate(streamed):
            expected = models.generate(model, [1, 4 + i, 9, 11], mode=modes[i], max_new_tokens=10, block_length=4)
            assert tokens == expected.tokens
        assert scores == score_with_top(model, [1, 4, 9, 11, 12], 2)
        with pytest.raises(ValueError, match="pool holds 128"):
            asyncio.run(refused())
        assert asyncio.run(cancelled())
        assert driver.failure() is None and driver.stuck_for() == 0.0
    finally:
        driver.close()
    assert driver._process.returncode == 0  # it ended by itself when its front went away, not killed


def test_a_dead_engine_process_fails_its_requests_and_the_health_check(tmp_path):
    from deployments.server import ModelServer

    save_model(random_model(seed=27, eos_token_id=None), tmp_path / "m")
    server = ModelServer(asdict(ModelSpec(name="m", path=str(tmp_path / "m"), num_pages=64)))
    assert isinstance(server.engine, ProcessEngine)
    server.check_health()

    async def main():
        request = {"request_id": "r", "prompt": [1, 5, 6], "params": {"mode": "ar", "max_new_tokens": 200}}
        async for _ in server.generate(request):
            server.engine._process.kill()

    with pytest.raises(RuntimeError, match="engine process exited"):
        asyncio.run(main())
    with pytest.raises(RuntimeError, match="engine process exited"):
        server.check_health()


def test_engine_process_that_cannot_load_raises_its_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        ProcessEngine(EngineSettings(str(tmp_path / "missing")))


def test_stats_go_with_a_step_only_when_due():
    def out(finished):
        return StepOutput("r", [5], finished, "length" if finished else None, 1, 1, None, [])

    quiet = ([out(False)], (1, 0), (1, 0), STATS_INTERVAL_S / 2)
    assert not stats_due(*quiet)  # same counts, nothing finished, sent recently: the front keeps its copy
    assert stats_due([out(False), out(True)], *quiet[1:])  # a request finished
    assert stats_due(quiet[0], (2, 0), (1, 0), quiet[3])  # one more request running
    assert stats_due(quiet[0], (1, 1), (1, 0), quiet[3])  # one waiting
    assert stats_due(*quiet[:3], STATS_INTERVAL_S)  # their interval passed

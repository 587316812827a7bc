"""The static decode step that CUDA graphs capture, run eagerly on the CPU with the Triton kernels
forced on (interpreter): its logits equal the eager step's bit for bit, requests are padded to a
bucket, and every step a graph cannot take runs eagerly. test_gpu.py captures and replays it."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

import kernels  # noqa: E402
from models.batch import pack  # noqa: E402
from models.engine import Engine  # noqa: E402
from models.engine.decode_graphs import DecodeGraphs, decode_row  # noqa: E402
from models.modes import DecodeParams  # noqa: E402
from models.modes.base import Plan  # noqa: E402
from models.segments import bidirectional_segment, causal_segment  # noqa: E402
from tests.conftest import random_model  # noqa: E402
from tests.test_engine import _drain  # noqa: E402


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "FORCED", "triton")


def _graphed(model, max_running: int, checked: list[int]) -> Engine:
    """An engine whose AR steps go through the static step; each one is also run eagerly on the same
    cache (rewriting the same keys and values) and must give the same logits."""
    engine = Engine(model, num_pages=64, page_size=8, max_running=max_running)
    graphs = DecodeGraphs(model, engine.cache, engine.kv, max_running, capture=False)
    run = graphs.run

    def checked_run(scheduled):
        logits = run(scheduled)
        if logits is not None:
            items = [(seq_id, seg) for seq_id, plan, _ in scheduled for seg in plan.segments]
            eager = model(pack(items, engine.kv), engine.cache)
            assert torch.equal(logits, eager)
            checked.append(len(scheduled))
        return logits

    graphs.run = checked_run
    engine.runner.graphs = graphs
    return engine


def test_graphed_decode_steps_equal_eager_ones(triton_kernels):
    model = random_model(seed=5)
    phases = [
        {  # AR requests only: 3 padded to a bucket of 4, then fewer as they finish
            "a": ([1, 4, 9, 16, 25], DecodeParams(mode="ar", max_new_tokens=6)),
            "b": ([1, 7, 7, 3], DecodeParams(mode="ar", max_new_tokens=5)),
            "c": ([1, 30, 2, 5, 8, 13, 21], DecodeParams(mode="ar", max_new_tokens=4)),
        },
        {  # beside a speculative request its steps run eagerly, and alone again it is graphed
            "d": ([1, 11, 12], DecodeParams(mode="linear_spec", max_new_tokens=3, block_length=4)),
            "e": ([1, 4, 9, 16, 25], DecodeParams(mode="ar", max_new_tokens=12)),
        },
    ]
    checked: list[int] = []
    graphed, eager = _graphed(model, 4, checked), Engine(model, num_pages=64, page_size=8, max_running=4)
    graphed_steps = []
    for requests in phases:
        outputs = []
        for engine in (graphed, eager):
            for rid, (prompt, params) in requests.items():
                engine.add_request(rid, prompt, params)
            outputs.append(_drain(engine))
        assert outputs[0] == outputs[1]
        graphed_steps.append(list(checked))
        checked.clear()
    first, second = graphed_steps
    assert first[:2] == [3, 3] and {2, 1} <= set(first[2:]), first
    assert second and set(second) == {1}, second


def test_steps_a_graph_cannot_take_run_eagerly():
    assert decode_row(Plan([causal_segment([5], 7, write=True)], None)) == (5, 7)
    not_decodes = [
        [causal_segment([5, 6], 7, write=True)],  # a prefill chunk or a verify block
        [causal_segment([5], 7)],  # nothing written
        [bidirectional_segment([5], 7)],
        [causal_segment([5], 7, write=True, adapter=True)],
        [causal_segment([5], 7, write=True, logit_rows=[])],
        [causal_segment([5], 7, write=True), causal_segment([6], 8, write=True)],
    ]
    for segments in not_decodes:
        assert decode_row(Plan(segments, None)) is None


def test_buckets_cover_the_engine_limit(triton_kernels):
    model = random_model(seed=5)
    engine = Engine(model, num_pages=16, page_size=8, max_running=12)
    graphs = DecodeGraphs(model, engine.cache, engine.kv, 12, capture=False)
    assert sorted(graphs.buckets) == [1, 2, 4, 8, 12]
    assert graphs.run([]) is None


def test_an_engine_on_a_cpu_ignores_cuda_graphs():
    engine = Engine(random_model(seed=5), num_pages=16, page_size=8, max_running=4, cuda_graphs=True)
    assert engine.runner.graphs is None

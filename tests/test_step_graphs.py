"""The static steps that CUDA graphs capture, run eagerly on the CPU with the Triton kernels forced on
(interpreter): their logits, and the hidden states they defer, equal the eager step's bit for bit for
every shape a graph takes (AR tokens, drafts with the adapter, verify windows, quadratic cycles,
denoise passes, block commits), requests are padded to a bucket, and every step a graph cannot take
runs eagerly. test_gpu.py captures and replays them."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.masks import MaskKind  # noqa: E402
from models.batch import pack  # noqa: E402
from models.engine import Engine, step_graphs  # noqa: E402
from models.engine.step_graphs import AR_DECODE, MAX_ROWS, SegmentShape, StepGraphs, StepShape, step_shape  # noqa: E402
from models.layers import LoraWeights  # noqa: E402
from models.modes import DecodeParams  # noqa: E402
from models.modes.base import Plan  # noqa: E402
from models.segments import bidirectional_segment, causal_segment  # noqa: E402
from tests.conftest import random_model  # noqa: E402
from tests.test_engine import _drain  # noqa: E402


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "FORCED", "triton")


def _with_adapter(model):
    """A random draft adapter on every layer's o_proj, so drafts differ from AR rows."""
    gen = torch.Generator().manual_seed(3)
    hidden = model.config.hidden_size
    for layer in model.encoder.layers:
        layer.set_lora(
            "o_proj",
            LoraWeights(a=torch.randn(2, hidden, generator=gen), b=torch.randn(hidden, 2, generator=gen), scale=0.5),
        )
    return model


def _graphed(model, max_running: int, checked: list[tuple[StepShape, int]]) -> Engine:
    """An engine whose steps go through the static steps; each one a graph takes is first run eagerly
    on the same cache (writing the same keys and values) and must give the same logits and deferred
    hidden states."""
    engine = Engine(model, num_pages=64, page_size=8, max_running=max_running)
    graphs = StepGraphs(model, engine.cache, engine.kv, max_running, capture=False)
    run = graphs.run

    def checked_run(scheduled):
        items = [(seq_id, seg) for seq_id, plan, _ in scheduled for seg in plan.segments]
        eager = model(pack(items, engine.kv), engine.cache)
        deferred = model.deferred
        logits = run(scheduled)
        if logits is not None:
            assert torch.equal(logits, eager)
            assert (deferred is None) == (model.deferred is None)
            assert deferred is None or torch.equal(model.deferred, deferred)
            checked.append((step_shape(scheduled[0][1]), len(scheduled)))
        return logits

    graphs.run = checked_run
    engine.runner.graphs = graphs
    return engine


def test_graphed_steps_equal_eager_ones(triton_kernels):
    model = _with_adapter(random_model(seed=5))
    phases = [
        {  # AR requests only: 3 padded to a bucket of 4, then fewer as they finish
            "a": ([1, 4, 9, 16, 25], DecodeParams(mode="ar", max_new_tokens=6)),
            "b": ([1, 7, 7, 3], DecodeParams(mode="ar", max_new_tokens=5)),
            "c": ([1, 30, 2, 5, 8, 13, 21], DecodeParams(mode="ar", max_new_tokens=4)),
        },
        {"d": ([1, 11, 12], DecodeParams(mode="linear_spec", max_new_tokens=10, block_length=4))},
        {"e": ([1, 5, 6, 7], DecodeParams(mode="diffusion", max_new_tokens=8, block_length=4))},
        {"q": ([1, 9, 8, 7], DecodeParams(mode="quadratic_spec", max_new_tokens=10, block_length=4))},
        {  # beside an AR request a speculative one's steps have other shapes: eager
            "f": ([1, 11, 12], DecodeParams(mode="linear_spec", max_new_tokens=3, block_length=4)),
            "g": ([1, 4, 9, 16, 25], DecodeParams(mode="ar", max_new_tokens=12)),
        },
    ]
    checked: list[tuple[StepShape, int]] = []
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
    ar, linear, diffusion, quadratic, mixed = graphed_steps
    assert ar[:2] == [(AR_DECODE, 3), (AR_DECODE, 3)] and {2, 1} <= {n for _, n in ar[2:]}, ar
    draft = (SegmentShape(4, MaskKind.BIDIRECTIONAL, write=False, adapter=True),)
    assert draft in {s for s, _ in linear}, linear
    assert any(s[0].kind is MaskKind.CAUSAL and s[0].write and s[0].rows > 1 for s, _ in linear), linear  # verify
    denoise = (SegmentShape(4, MaskKind.BIDIRECTIONAL, write=False, adapter=False),)
    commit = (SegmentShape(4, MaskKind.CAUSAL, write=True, adapter=False),)
    assert {denoise, commit} <= {s for s, _ in diffusion}, diffusion
    cycles = [s for s, _ in quadratic if len(s) == 2]  # a verify and a branch's draft, its rows deferred
    assert cycles and all(s[1].deferred and not s[1].reads and s[1].adapter for s in cycles), quadratic
    assert mixed and {s for s, _ in mixed} == {AR_DECODE}, mixed  # AR alone again once f finished


def test_precaptured_shapes_are_all_a_lone_request_comes_to(triton_kernels):
    """After ``precapture`` of a block length (what a serving engine does before taking requests), a lone
    request in any mode at that block length needs no further graph: block_shapes names every shape the
    modes plan."""
    model = _with_adapter(random_model(seed=5))
    engine = Engine(model, num_pages=64, page_size=8, max_running=1)
    graphs = engine.runner.graphs = StepGraphs(model, engine.cache, engine.kv, 1, capture=False)
    count = graphs.precapture([4])
    assert count == 1 + len(step_graphs.block_shapes(4)) == 1 + 2 + 2 * 3
    prompts = {"ar": [1, 4, 9], "linear_spec": [1, 11, 12], "quadratic_spec": [1, 9, 8, 7], "diffusion": [1, 5, 6]}
    for mode, prompt in prompts.items():
        engine.add_request(mode, prompt, DecodeParams(mode=mode, max_new_tokens=14, block_length=4))
        _drain(engine)
    assert len(graphs.graphs) == count, sorted(set(graphs.graphs) - set(list(graphs.graphs)[:count]), key=str)


def test_steps_a_graph_cannot_take_run_eagerly():
    assert step_shape(Plan([causal_segment([5], 7, write=True)], None)) == AR_DECODE
    assert step_shape(Plan([bidirectional_segment([5, 3, 3], 7, logit_rows=[1, 2])], None)) == (
        SegmentShape(3, MaskKind.BIDIRECTIONAL, write=False, adapter=False),
    )
    cycle = [causal_segment([5, 6], 7, write=True), bidirectional_segment([6, 3], 9, logit_rows=[], deferred_rows=[1])]
    assert step_shape(Plan(cycle, None)) == (
        SegmentShape(2, MaskKind.CAUSAL, write=True, adapter=False),
        SegmentShape(2, MaskKind.BIDIRECTIONAL, write=False, adapter=False, reads=False, deferred=(1,)),
    )
    shifted = causal_segment([5, 6], 7, write=True)
    shifted.positions = [8, 9]
    partly_written = causal_segment([5, 6], 7, write=True)
    partly_written.write = [True, False]
    not_graphed = [
        Plan([causal_segment([5, 6], 7, write=True)], None, prefill_stop=9),  # a prefill chunk
        Plan([causal_segment([5], 7, write=True, logit_rows=[])], None),  # nothing read
        Plan([shifted], None),
        Plan([partly_written], None),
        Plan([bidirectional_segment([5, 6], 7, logit_rows=[], deferred_rows=[1])], None),  # nothing read now
    ]
    for plan in not_graphed:
        assert step_shape(plan) is None


def test_buckets_cover_the_engine_limit_and_large_or_late_steps_stay_eager(triton_kernels, monkeypatch):
    model = random_model(seed=5)
    engine = Engine(model, num_pages=16, page_size=8, max_running=12)
    graphs = StepGraphs(model, engine.cache, engine.kv, 12, capture=False)
    assert graphs.buckets == [1, 2, 4, 8, 12]
    assert sorted(size for shape, size in graphs.graphs if shape == AR_DECODE) == [1, 2, 4, 8, 12]
    assert graphs.run([]) is None
    assert graphs._graph((SegmentShape(MAX_ROWS // 8 + 1, MaskKind.CAUSAL, True, False),), 8, None) is None
    verify = (SegmentShape(4, MaskKind.CAUSAL, True, False),)
    monkeypatch.setattr(step_graphs, "MAX_GRAPHS", len(graphs.graphs) + 1)
    assert graphs._graph(verify, 1, None) is not None  # the last one allowed
    assert graphs._graph(verify, 2, None) is None and graphs._graph(verify, 1, None) is not None


def test_an_engine_on_a_cpu_ignores_cuda_graphs():
    engine = Engine(random_model(seed=5), num_pages=16, page_size=8, max_running=4, cuda_graphs=True)
    assert engine.runner.graphs is None

"""On a CUDA GPU (skipped elsewhere): the Triton path reproduces the official outputs, stays lossless,
and computes a request the same alone as in a batch. ``bench/gpu_check.sh`` runs this file."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import models
from models.engine import Engine
from models.modes import DecodeParams
from tests.test_lossless import SPEC_MODES, _heldout_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_model(fixture_path):
    return models.load_model(fixture_path, device="cuda", dtype=torch.float32)


def test_golden_records_on_gpu(gpu_model, golden_records):
    for record in golden_records[::5]:
        params = record["params"]
        kwargs = {"mode": record["mode"], "max_new_tokens": params["max_new_tokens"]}
        if record["mode"] in ("diffusion", "linear_spec"):
            kwargs["block_length"] = params["block_length"]
        if record["mode"] == "diffusion":
            kwargs["threshold"] = params["threshold"]
        out = models.generate(gpu_model, record["prompt_ids"], **kwargs)
        assert out.tokens == record["output_ids"][: params["max_new_tokens"]], (record["prompt_id"], record["mode"])


@pytest.mark.parametrize("block_length", [4, 8, 32])
def test_lossless_on_gpu(gpu_model, block_length):
    for prompt in _heldout_prompts(gpu_model.tokenizer, 3, random.Random(block_length)):
        ar = models.generate(gpu_model, prompt, mode="ar", max_new_tokens=40)
        for mode in SPEC_MODES:
            spec = models.generate(gpu_model, prompt, mode=mode, max_new_tokens=40, block_length=block_length)
            assert spec.tokens == ar.tokens, (mode, block_length)


def test_batched_equals_alone_on_gpu(gpu_model):
    prompts = _heldout_prompts(gpu_model.tokenizer, 6, random.Random(0))
    modes = ["ar", "diffusion", "linear_spec", "quadratic_spec", "ar", "linear_spec"]
    alone = [
        models.generate(gpu_model, p, mode=m, max_new_tokens=32, block_length=8).tokens for p, m in zip(prompts, modes)
    ]
    engine = Engine(gpu_model, num_pages=256, max_running=8)
    states = [
        engine.add_request(str(i), p, DecodeParams(mode=m, max_new_tokens=32, block_length=8)).state
        for i, (p, m) in enumerate(zip(prompts, modes))
    ]
    while engine.has_work:
        engine.step()
    assert [s.tokens for s in states] == alone


def _graphed_and_eager(model, requests: list[tuple[list[int], DecodeParams]]) -> tuple[list, list, int, Engine]:
    """Every request's tokens decoded together without and with CUDA graphs, the replays counted."""
    outputs, replays = [], 0
    for graphs in (False, True):
        engine = Engine(model, num_pages=256, max_running=8, cuda_graphs=graphs)
        if graphs:
            captured = engine.runner.graphs
            assert captured.graphs and all(entry.graph is not None for entry in captured.graphs.values())

            def counted(scheduled, run=captured.run):
                nonlocal replays
                logits = run(scheduled)
                replays += logits is not None
                return logits

            captured.run = counted
        states = [engine.add_request(str(i), p, params).state for i, (p, params) in enumerate(requests)]
        while engine.has_work:
            engine.step()
        outputs.append([s.tokens for s in states])
    return outputs[0], outputs[1], replays, engine


def test_cuda_graphs_decode_as_eager_steps(gpu_model):
    prompts = _heldout_prompts(gpu_model.tokenizer, 5, random.Random(1))
    modes = ["ar", "ar", "ar", "linear_spec", "ar"]
    # the speculative request ends early: after it, every step is one of AR decodes
    requests = [
        (p, DecodeParams(mode=m, max_new_tokens=8 if m != "ar" else 32, block_length=8)) for p, m in zip(prompts, modes)
    ]
    eager, graphed, replays, _ = _graphed_and_eager(gpu_model, requests)
    assert eager == graphed and replays > 10


@pytest.mark.parametrize("mode", ["linear_spec", "quadratic_spec", "diffusion"])
def test_cuda_graphs_of_drafts_verifies_and_denoise_passes(gpu_model, mode):
    """A lone request's steps other than AR tokens are graphed too (quadratic cycles with their deferred
    branch rows), captured the first time their shape comes up; the tokens are the eager steps' (and so,
    for the speculative modes, AR's)."""
    prompt = _heldout_prompts(gpu_model.tokenizer, 1, random.Random(2))[0]
    eager, graphed, replays, engine = _graphed_and_eager(
        gpu_model, [(prompt, DecodeParams(mode=mode, max_new_tokens=48, block_length=8))]
    )
    shapes = {shape for shape, _ in engine.runner.graphs.graphs}
    assert eager == graphed and replays > 5
    assert all(entry.graph is not None for entry in engine.runner.graphs.graphs.values())  # every capture took
    assert any(seg.rows == 8 and seg.kind.name == "BIDIRECTIONAL" for shape in shapes for seg in shape), shapes


def test_calibration_replays_graphs_as_replicas_do(gpu_model):
    from models.calibration import calibrate

    options = calibrate(gpu_model, blocks=(8,), prompts=2, max_new_tokens=16, batch=2, rounds=1)
    assert set(options) == {"ar", "diffusion@8", "linear_spec@8", "quadratic_spec@8"}
    assert all(stats.tpf > 0 and stats.step_s > 0 for stats in options.values()), options


def test_a_served_engine_captures_its_graphs_at_load(gpu_model, fixture_path):
    from models.engine.host import EngineSettings, build_engine

    settings = EngineSettings(str(fixture_path), device="cuda", engine={"num_pages": 64, "cuda_graphs": True})
    engine, info = build_engine(gpu_model, settings)
    assert engine.runner.graphs is not None and info["cuda_graphs_s"] > 0
    assert info["cuda_graphs"] == len(engine.runner.graphs.graphs) > len(engine.runner.graphs.buckets)


def test_images_on_gpu_speculation_equals_ar():
    """The bundled VLM on the GPU (vision encoder, projector and image rows through the Triton path): an
    image changes the output, and both speculative modes emit AR's tokens with it, graphed or not."""
    import numpy as np
    from PIL import Image

    from models.vlm import load_vlm
    from vision.preprocess import placeholder_ids, preprocess

    vlm = load_vlm(Path(__file__).parent.parent / "models" / "bundled" / "tiny-vlm", device="cuda", dtype=torch.float32)
    text, config = vlm.language_model, vlm.config
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    pixels, layout = preprocess(picture, config.vision, config.spatial_merge_size)
    prompt = [config.bos_token_id or 1, *placeholder_ids(layout, config.image_tokens(text.tokenizer)), 5]
    embeds = vlm.prompt_embeds(prompt, [pixels])
    ar = models.generate(text, prompt, mode="ar", max_new_tokens=12, embeds=embeds)
    assert ar.tokens != models.generate(text, prompt, mode="ar", max_new_tokens=12).tokens
    for mode in ("linear_spec", "quadratic_spec"):
        spec = models.generate(text, prompt, mode=mode, max_new_tokens=12, block_length=4, embeds=embeds)
        assert spec.tokens == ar.tokens, mode
    engine = Engine(text, num_pages=64, max_running=2, cuda_graphs=True)
    state = engine.add_request(
        "r", prompt, DecodeParams(mode="linear_spec", max_new_tokens=12, block_length=4), embeds
    ).state
    while engine.has_work:
        engine.step()
    assert state.tokens == ar.tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matmul_rows_do_not_depend_on_the_row_count_on_gpu(dtype):
    """Here rather than in test_kernels_matmul.py, which turns on Triton's interpreter at import."""
    from kernels.matmul import matmul_triton

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 512, generator=gen).to(dtype).cuda()
    w = (torch.randn(1024, 512, generator=gen) / 512**0.5).to(dtype).cuda()
    full = matmul_triton(x, w)
    for rows in list(range(1, 40)) + [63, 64, 65, 128, 299]:
        for start in (0, 7):
            assert torch.equal(matmul_triton(x[start : start + rows], w), full[start : start + rows])

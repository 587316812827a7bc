"""Tensor parallelism without Ray: real gloo process groups on 127.0.0.1 (one spawn per group size).

Rank 0 drives ``generate`` through ``TensorParallelModel``; the other ranks ``follow``. Greedy
tokens must equal TP=1 exactly in every mode; logits agree to fp32 tolerance (the all-reduce sums
in a different order than one full matrix product).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import models
from models.batch import pack
from models.config import ModelConfig
from models.engine import KVCacheManager
from models.loading import load_tokenizer, save_model
from models.segments import bidirectional_segment, causal_segment
from models.tensor_parallel import check_shardable, decoder, shard_range
from models.vlm import load_vlm, read_config, save_vlm
from tests.conftest import REPO, random_model
from tests.test_loading import _write_adapter
from tests.test_vlm import picture, prompt_with, random_vlm
from vision.preprocess import preprocess

TINY = REPO / "models" / "bundled" / "tiny-code"
MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]
PROMPT_IDS = [1, 7, 9, 13, 21, 30, 5]  # for the random model, which has no tokenizer
PROMPT_TEXT = "def fibonacci(n):\n    if n < 2:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_all(model, prompt: list[int], embeds=None) -> dict[str, object]:
    """Greedy tokens of every mode, plus logits of a causal prefill and an adapter draft block."""
    out: dict[str, object] = {
        mode: models.generate(model, prompt, mode=mode, max_new_tokens=24, block_length=8, embeds=embeds).tokens
        for mode in MODES
    }
    cache, kv = model.new_cache(4), KVCacheManager(4, 16)
    kv.add(0)
    kv.reserve(0, len(prompt))
    prefill = model(pack([(0, causal_segment(prompt, 0, write=True))], kv, model.device), cache)
    kv.set_length(0, len(prompt))
    block = [int(prefill[-1].argmax())] + [model.config.mask_token_id] * 7
    draft = model(pack([(0, bidirectional_segment(block, len(prompt), adapter=True))], kv, model.device), cache)
    out["logits"] = torch.cat([prefill, draft]).clone()
    return out


def prompt_for(path) -> list[int]:
    has_tokenizer = (Path(path) / "tokenizer.json").is_file()
    return load_tokenizer(path).encode(PROMPT_TEXT) if has_tokenizer else PROMPT_IDS


def decode_case(shard, model, prompt: list[int], images: list | None) -> dict[str, object]:
    """``decode_all`` on a loaded checkpoint; a VLM's images are encoded by its own vision tower."""
    return decode_all(model, prompt, shard.prompt_embeds(prompt, images) if images else None)


def _rank_main(rank: int, world: int, port: int, cases: dict[str, tuple], out_file: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from models.tensor_parallel import TensorParallelModel, follow, init_rank, load_shard

    init_rank(rank, world, "127.0.0.1", port, backend="gloo")
    results = {}
    for path, (prompt, images) in cases.items():
        shard = load_shard(path, dtype=torch.float32)
        if rank == 0:
            model = TensorParallelModel(decoder(shard))
            results[path] = decode_case(shard, model, prompt, images)
            model.close()
        else:
            assert follow(decoder(shard)) == 0  # every cache rank 0 let go of was freed here too
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


def text_case(path) -> tuple[list[int], None]:
    return prompt_for(path), None


def run_group(world: int, cases: dict, tmp_path) -> dict:
    """Decode every (path -> (prompt, images)) case on one spawned gloo group of ``world`` ranks."""
    out = tmp_path / f"tp{world}.pt"
    cases = {str(path): case for path, case in cases.items()}
    mp.spawn(_rank_main, args=(world, free_port(), cases, str(out)), nprocs=world)
    return torch.load(out)


@pytest.fixture(scope="module")
def adapter_model(tmp_path_factory):
    """A random model whose heads allow TP=4, with a draft adapter on o_proj and the MLP (each projection
    sharded its own way) and a vocabulary of 66 (uneven over 4)."""
    folder = tmp_path_factory.mktemp("tp4")
    model = random_model(seed=3, num_attention_heads=8, num_key_value_heads=4, vocab_size=66)
    save_model(model, folder)
    _write_adapter(folder, model, mlp_rank=2)
    return folder


@pytest.fixture(scope="module")
def vlm_case(tmp_path_factory):
    """A random VLM checkpoint (decoder at TP=2, vision tower whole) and a prompt with one image."""
    folder = tmp_path_factory.mktemp("vlm")
    vlm = random_vlm(seed=2)
    save_vlm(vlm, folder)
    pixels, layout = preprocess(picture(60, 40), vlm.config.vision, vlm.config.spatial_merge_size)
    return folder, (prompt_with(layout), [pixels])


def assert_matches_tp1(path, case: tuple, got: dict) -> None:
    if read_config(path)[1] is not None:
        shard = load_vlm(path, dtype=torch.float32, tokenizer=False)
    else:
        shard = models.load_model(path, dtype=torch.float32, tokenizer=False)
    reference = decode_case(shard, decoder(shard), *case)
    for mode in MODES:
        assert got[mode] == reference[mode], f"{path} {mode}"
    assert got["logits"].shape == reference["logits"].shape
    torch.testing.assert_close(got["logits"], reference["logits"], rtol=1e-4, atol=1e-4)


def test_tp2_matches_tp1_in_every_mode(fixture_path, adapter_model, vlm_case, tmp_path):
    cases = {path: text_case(path) for path in (TINY, fixture_path, adapter_model)}
    cases[vlm_case[0]] = vlm_case[1]
    results = run_group(2, cases, tmp_path)
    for path, case in cases.items():
        assert_matches_tp1(path, case, results[str(path)])


def test_tp4_matches_tp1_in_every_mode(adapter_model, tmp_path):
    assert models.load_model(adapter_model, tokenizer=False).has_adapter
    case = text_case(adapter_model)
    results = run_group(4, {adapter_model: case}, tmp_path)
    assert_matches_tp1(adapter_model, case, results[str(adapter_model)])


def test_heads_must_divide():
    config = ModelConfig.from_file(TINY)  # 8 query heads, 2 kv heads
    check_shardable(config, 2)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) is not divisible by tensor_parallel_size \(4\)"):
        check_shardable(config, 4)
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) is not divisible .* \(3\)"):
        check_shardable(config, 3)


def test_uneven_vocabulary_split_covers_every_id():
    ranges = [shard_range(131073, 4, r) for r in range(4)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 131073
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert {stop - start for start, stop in ranges} == {32768, 32769}

"""Decoding with and without CUDA graphs (``Engine(cuda_graphs=...)``), on a CUDA GPU.

    python bench/step_graphs.py [--models PATH ...] [--modes ar linear_spec quadratic_spec diffusion]
        [--concurrency 1 16] [--block-length 8] [--max-tokens 64] [--rounds 2]

For each model (default: the bundled tiny-code and the fixture, at ``TRISERVE_FIXTURE`` where it was
copied), mode and concurrency C (speculative and diffusion modes at C = 1 only: beside other requests
their steps mix shapes and run eagerly), C greedy requests on held-out prompts of 96 tokens decode
``--max-tokens`` tokens in one engine, with graphs off and on, rounds interleaved (medians);
tokens/s, the ratio, and whether every request's tokens are identical either way (they must be).
Each engine decodes the prompts once before the timed rounds: the graphs of AR steps are captured
when the engine is built, the others the first time their shape comes up; that first decode's
seconds are printed apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import os
import statistics
import time

import torch

import models
from bench.tpf import heldout_prompts
from models.engine import Engine
from models.modes import DecodeParams

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(os.environ.get("TRISERVE_FIXTURE", REPO.parent / "shared" / "fixtures" / "tiny-trimode-code"))
DEFAULT_MODELS = [REPO / "models" / "bundled" / "tiny-code", FIXTURE]


def decode(engine: Engine, prompts: list[list[int]], params: DecodeParams) -> tuple[float, list[list[int]]]:
    """Tokens/s of the prompts decoded together (prefill included), and each one's tokens."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    states = [engine.add_request(str(i), p, params).state for i, p in enumerate(prompts)]
    while engine.has_work:
        engine.step()
    torch.cuda.synchronize()
    tokens = [s.tokens for s in states]
    return sum(map(len, tokens)) / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--modes", nargs="+", default=["ar", "linear_spec", "quadratic_spec", "diffusion"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: CUDA graphs apply to CUDA models only")
        return
    print(f"block length {args.block_length}, {args.max_tokens} new tokens\n")
    print("| model | mode | C | eager tok/s | graphs tok/s | graphs / eager | same tokens | graphs | first decode s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.models:
        if not path.exists():
            print(f"| {path.name} | missing | | | | | | | |")
            continue
        model = models.load_model(path, device="cuda")
        for mode in args.modes:
            params = DecodeParams(mode=mode, max_new_tokens=args.max_tokens, block_length=args.block_length)
            for c in args.concurrency if mode == "ar" else [1]:
                prompts = heldout_prompts(model.tokenizer, c, 96)
                engines, first = {}, 0.0
                for graphs in (False, True):
                    start = time.perf_counter()
                    engines[graphs] = Engine(model, num_pages=64 * c + 64, max_running=max(c, 1), cuda_graphs=graphs)
                    decode(engines[graphs], prompts, params)
                    first = time.perf_counter() - start
                speeds: dict[bool, list[float]] = {False: [], True: []}
                outputs: dict[bool, list[list[int]]] = {}
                for _ in range(args.rounds):
                    for graphs in (False, True):
                        speed, outputs[graphs] = decode(engines[graphs], prompts, params)
                        speeds[graphs].append(speed)
                eager, graphed = statistics.median(speeds[False]), statistics.median(speeds[True])
                same = "yes" if outputs[False] == outputs[True] else "NO"
                count = len(engines[True].runner.graphs.graphs)
                print(
                    f"| {path.name} | {mode} | {c} | {eager:.1f} | {graphed:.1f} | {graphed / eager:.2f}x | {same} "
                    f"| {count} | {first:.1f} |"
                )


if __name__ == "__main__":
    main()

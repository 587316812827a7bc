"""AR decoding with and without CUDA graphs (``Engine(cuda_graphs=...)``), on a CUDA GPU.

    python bench/decode_graphs.py [--models PATH ...] [--concurrency 1 16] [--rounds 2]

For each model (default: the bundled tiny-code and the fixture, at ``TRISERVE_FIXTURE`` where it was
copied) and each concurrency C, C greedy AR requests on held-out prompts of 96 tokens decode
``--max-tokens`` tokens in one engine, with graphs off and on, rounds interleaved (medians);
tokens/s, the ratio, and whether every request's tokens are identical either way (they must be).
Graph capture happens when the engine is built and is timed apart.
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


def decode(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Tokens/s of the prompts decoded together (prefill included), and each one's tokens."""
    params = DecodeParams(mode="ar", max_new_tokens=max_tokens)
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
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: CUDA graphs apply to CUDA models only")
        return
    print("| model | C | eager tok/s | graphs tok/s | graphs / eager | same tokens | capture s |")
    print("|---|---|---|---|---|---|---|")
    for path in args.models:
        if not path.exists():
            print(f"| {path.name} | missing | | | | | |")
            continue
        model = models.load_model(path, device="cuda")
        for c in args.concurrency:
            prompts = heldout_prompts(model.tokenizer, c, 96)
            speeds: dict[bool, list[float]] = {False: [], True: []}
            outputs: dict[bool, list[list[int]]] = {}
            capture = 0.0
            for _ in range(args.rounds):
                for graphs in (False, True):
                    start = time.perf_counter()
                    engine = Engine(model, num_pages=64 * c + 64, max_running=max(c, 1), cuda_graphs=graphs)
                    if graphs:
                        capture = time.perf_counter() - start
                    speed, outputs[graphs] = decode(engine, prompts, args.max_tokens)
                    speeds[graphs].append(speed)
            eager, graphed = statistics.median(speeds[False]), statistics.median(speeds[True])
            same = "yes" if outputs[False] == outputs[True] else "NO"
            ratio = graphed / eager
            print(f"| {path.name} | {c} | {eager:.1f} | {graphed:.1f} | {ratio:.2f}x | {same} | {capture:.1f} |")


if __name__ == "__main__":
    main()

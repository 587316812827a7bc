"""In-process engine throughput (no Ray, no HTTP): batching, prefix caching and KV memory.

    python bench/engine_throughput.py [--model models/bundled/tiny-code] [--requests 64] [--max-tokens 48]

Three tables, each measured as ratios within this one run (rounds interleaved, medians):

1. tokens/s with at most C requests in the engine at once (C = 1, 4, 16, 64) for AR, each other
   mode and a round-robin mix, greedy; the ratio to C = 1 and whether every request's tokens are
   identical at every C (they must be).
2. time to first token for requests that share a long prefix, sent one after another, with prefix
   caching on and off (same tokens either way).
3. KV pages in use (peak and mean over the steps) with 64 requests running at once, against what
   reserving each request's worst case at admission (the previous engine's policy) would have held.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import statistics
import time

import torch

import models
from models.engine import Engine
from models.modes import DecodeParams, kv_tokens_needed

REPO = Path(__file__).resolve().parent.parent
MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Cache:\n    def __init__(self, size):\n",
    'def parse(text):\n    """Parse a config file."""\n',
    "for path in sorted(paths):\n    with open(path) as f:\n",
]


def workload(tokenizer, name: str, count: int, max_tokens: int, block: int) -> list[tuple[list[int], DecodeParams]]:
    out = []
    for i in range(count):
        mode = MODES[i % len(MODES)] if name == "mix" else name
        params = DecodeParams(mode=mode, max_new_tokens=max_tokens, block_length=block)
        out.append((tokenizer.encode(PROMPTS[i % len(PROMPTS)]), params))
    return out


def run(engine_args: dict, model, requests, concurrency: int) -> tuple[float, list[list[int]], list[int]]:
    """(seconds, tokens per request, KV pages in use after each step) with at most ``concurrency``
    requests in the engine."""
    engine = Engine(model, **engine_args)
    pending = list(enumerate(requests))
    tokens: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    pages = []
    start = time.perf_counter()
    while pending or engine.has_work:
        while pending and len(engine.scheduler.running) + len(engine.scheduler.waiting) < concurrency:
            i, (prompt, params) = pending.pop(0)
            engine.add_request(str(i), prompt, params)
        for out in engine.step():
            tokens[int(out.request_id)] += out.new_tokens
        pages.append(engine.kv.used_pages)
    return time.perf_counter() - start, [tokens[i] for i in range(len(requests))], pages


def throughput_table(model, args, engine_args: dict) -> None:
    print(f"\n## tokens/s by concurrency ({args.requests} requests, {args.max_tokens} tokens, block {args.block})\n")
    levels = args.concurrency
    header = "| workload | " + " | ".join(f"C={c} tok/s" for c in levels) + " | "
    header += " | ".join(f"C={c} ratio" for c in levels if c != 1) + " | identical |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.workloads:
        requests = workload(model.tokenizer, name, args.requests, args.max_tokens, args.block)
        seconds: dict[int, list[float]] = {c: [] for c in levels}
        outputs: dict[int, list[list[int]]] = {}
        for _ in range(args.rounds):  # interleaved: C=1, 4, 16, 64, C=1, 4, ...
            for c in levels:
                elapsed, tokens, _ = run(engine_args, model, requests, c)
                seconds[c].append(elapsed)
                outputs.setdefault(c, tokens)
                if tokens != outputs[levels[0]]:
                    raise SystemExit(f"{name}: tokens at concurrency {c} differ from concurrency {levels[0]}")
        total = sum(len(t) for t in outputs[levels[0]])
        rate = {c: total / statistics.median(seconds[c]) for c in levels}
        cells = [f"{rate[c]:.1f}" for c in levels] + [f"{rate[c] / rate[levels[0]]:.2f}x" for c in levels if c != 1]
        print(f"| {name} | " + " | ".join(cells) + " | yes |")


def prefix_table(model, args, engine_args: dict) -> None:
    tok = model.tokenizer
    text = (REPO / "models" / "engine" / "scheduler.py").read_text()
    shared = tok.encode(text[: 8 * args.prefix_tokens])[: args.prefix_tokens]
    suffixes = [tok.encode(f"\n# variant {i}\ndef f{i}(x):\n") for i in range(args.prefix_requests)]
    print(f"\n## TTFT with a shared {len(shared)}-token prefix ({args.prefix_requests} requests, one after another)\n")
    ttft: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[list[int]]] = {True: [], False: []}
    hits = {}
    for _ in range(args.rounds):
        for caching in (True, False):
            engine = Engine(model, **{**engine_args, "prefix_caching": caching})
            for i, suffix in enumerate(suffixes):
                engine.add_request(str(i), shared + suffix, DecodeParams(mode="ar", max_new_tokens=8))
                start, first, out = time.perf_counter(), None, []
                while engine.has_work:
                    for o in engine.step():
                        if first is None and o.new_tokens:
                            first = time.perf_counter() - start
                        out += o.new_tokens
                if i:  # the first request fills the cache in both runs
                    ttft[caching].append(first)
                if len(tokens[caching]) < len(suffixes):
                    tokens[caching].append(out)
            hits[caching] = engine.stats.prefix_hits
    if tokens[True] != tokens[False]:
        raise SystemExit("prefix caching changed the tokens")
    on, off = statistics.median(ttft[True]), statistics.median(ttft[False])
    print("| prefix caching | TTFT p50 (ms) | prefix-cache hit tokens | identical |")
    print("|---|---|---|---|")
    print(f"| on | {on * 1e3:.1f} | {hits[True]} | yes |")
    print(f"| off | {off * 1e3:.1f} | {hits[False]} | yes |")
    print(f"\nTTFT ratio off / on: {off / on:.2f}x")


def memory_table(model, args, engine_args: dict) -> None:
    print("\n## KV pages with 64 requests at once\n")
    print("| workload | on demand: peak in use | on demand: mean in use | worst case reserved at admission |")
    print("|---|---|---|---|")
    page = engine_args["page_size"]
    for name in args.workloads:
        requests = workload(model.tokenizer, name, 64, args.max_tokens, args.block)
        _, _, pages = run(engine_args, model, requests, 64)
        worst = sum(-(-kv_tokens_needed(len(p), prm, model.config.block_size) // page) for p, prm in requests)
        print(f"| {name} | {max(pages)} | {statistics.mean(pages):.0f} | {worst} |")
    print(f"\npool: {engine_args['num_pages']} pages of {page} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "bundled" / "tiny-code"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--workloads", nargs="+", default=[*MODES, "mix"], choices=[*MODES, "mix"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prefix-tokens", type=int, default=200)
    parser.add_argument("--prefix-requests", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tables", nargs="+", default=["throughput", "prefix", "memory"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = models.load_model(args.model, dtype=args.dtype)
    engine_args = {"num_pages": 1024, "page_size": 16, "max_running": 64, "max_step_tokens": 2048}
    print(f"model {args.model} ({args.dtype}), torch threads {args.threads}")
    tables = {"throughput": throughput_table, "prefix": prefix_table, "memory": memory_table}
    for name in args.tables:
        tables[name](model, args, engine_args)


if __name__ == "__main__":
    with torch.inference_mode():
        main()

"""Load against a running triserve app on 127.0.0.1: throughput, TTFT and e2e latency per mode.

    triserve serve &                      # or any app serving the model
    python bench/serve_load.py [--url http://127.0.0.1:8000] [--model tiny] [--requests 32]

For each concurrency (1, 4, 16) it sends a fixed number of streamed requests with a mix of
modes, then the same requests one at a time (the no-batching baseline), and prints tokens/s,
TTFT and e2e p50/p99 per mode, and the throughput ratio batched / one-at-a-time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import json
import os
import time

import httpx

MODES = ("ar", "linear_spec", "quadratic_spec", "diffusion")
PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Cache:\n    def __init__(self, size):\n",
    'def parse(text):\n    """Parse a config file."""\n',
    "for path in sorted(paths):\n    with open(path) as f:\n",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def one(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int, key: str | None) -> dict:
    mode = MODES[i % len(MODES)]
    body = {
        "model": model,
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "decoding": {"mode": mode, "block_length": 8},
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"mode": mode, "ttft": first or 0.0, "e2e": time.perf_counter() - start, "tokens": tokens}


async def run(url: str, model: str, requests: int, concurrency: int, max_tokens: int, key: str | None):
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def bounded(i):
            async with limit:
                return await one(client, url, model, i, max_tokens, key)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return results, time.perf_counter() - start


def report(label: str, results: list[dict], seconds: float) -> float:
    throughput = sum(r["tokens"] for r in results) / seconds
    print(f"\n{label}: {len(results)} requests in {seconds:.1f}s, {throughput:.1f} tokens/s")
    print(f"{'mode':<16}{'n':>4}{'ttft p50':>10}{'ttft p99':>10}{'e2e p50':>10}{'e2e p99':>10}")
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        if rows:
            ttft = [r["ttft"] for r in rows]
            e2e = [r["e2e"] for r in rows]
            print(
                f"{mode:<16}{len(rows):>4}{percentile(ttft, 0.5):>10.3f}{percentile(ttft, 0.99):>10.3f}"
                f"{percentile(e2e, 0.5):>10.3f}{percentile(e2e, 0.99):>10.3f}"
            )
    return throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    if not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("serve_load only targets a server on this machine (127.0.0.1)")
    key = os.environ.get("TRISERVE_API_KEY")
    baseline, seconds = asyncio.run(run(args.url, args.model, args.requests, 1, args.max_tokens, key))
    base = report("one at a time (no batching)", baseline, seconds)
    for c in args.concurrency:
        if c == 1:
            continue
        results, seconds = asyncio.run(run(args.url, args.model, args.requests, c, args.max_tokens, key))
        tput = report(f"concurrency {c}", results, seconds)
        print(f"throughput ratio vs one at a time: {tput / base:.2f}x")


if __name__ == "__main__":
    main()

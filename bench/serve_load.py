"""Load over HTTP against the Serve app on 127.0.0.1: throughput by concurrency, and prefix-cache TTFT.

    python bench/serve_load.py [--config deployments/configs/default.yaml] [--concurrency 1 4 16 64]
    python bench/serve_load.py --url http://127.0.0.1:8000   # an app already running (table 1 only)

Without ``--url`` it starts the app from the config (``triserve serve`` in its own process) on a free
loopback port, with one more copy of the first model that has prefix caching off, and stops it at
the end. The measured model runs on
``--replicas`` replicas (default 1), autoscaling pinned: the ratios measure batching, and a
scale-up left over from a C = 64 round would otherwise split the later rounds' batches. Measured as ratios in this
one run (rounds interleaved, medians), greedy, streamed:

1. tokens/s with C clients at once (C = 1, 4, 16, 64; max(16, C) requests) for AR, each other mode
   and a round-robin mix; the ratio to one client; every request's text must be identical at every C.
2. time to first token of requests that share a long prefix, sent one after another, with prefix
   caching on and off (same text either way).
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
import signal
import socket
import statistics
import subprocess
import tempfile
import time

import httpx
import yaml

from bench.engine_throughput import MODES, PROMPTS

REPO = Path(__file__).resolve().parent.parent
NO_CACHE = "-no-prefix-cache"


async def one(client: httpx.AsyncClient, url: str, body: dict, key: str | None) -> dict:
    """One streamed completion: time to first token, end to end, tokens, text, and the option that
    served it (the x-triserve-mode and -block-length headers)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.perf_counter()
    first, tokens, parts = None, 0, []
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
        resp.raise_for_status()
        mode, block = resp.headers.get("x-triserve-mode"), resp.headers.get("x-triserve-block-length")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter() - start
                parts.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    option = mode if block is None else f"{mode}@{block}"
    return {
        "ttft": first or 0.0,
        "e2e": time.perf_counter() - start,
        "tokens": tokens,
        "text": "".join(parts),
        "option": option,
    }


def request_body(model: str, workload: str, i: int, max_tokens: int, block: int) -> tuple[tuple, dict]:
    """(identity of the request's content, body): request i of a workload."""
    mode = MODES[i % len(MODES)] if workload == "mix" else workload
    prompt = PROMPTS[i % len(PROMPTS)]
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "decoding": {"mode": mode, "block_length": block},
    }
    return (mode, prompt), body


async def load(url: str, bodies: list[dict], concurrency: int, key: str | None) -> tuple[list[dict], float]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def bounded(body):
            async with limit:
                return await one(client, url, body, key)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(b) for b in bodies))
        return results, time.perf_counter() - start


def throughput_table(url: str, model: str, args, key: str | None) -> None:
    levels = args.concurrency
    print(
        f"\n## tokens/s by concurrency over HTTP (max(16, C) requests, {args.max_tokens} tokens, block {args.block})\n"
    )
    header = "| workload | " + " | ".join(f"C={c} tok/s" for c in levels) + " | "
    header += " | ".join(f"C={c} ratio" for c in levels if c != 1) + " | identical text |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for workload in args.workloads:
        rates: dict[int, list[float]] = {c: [] for c in levels}
        texts: dict[tuple, str] = {}
        for _ in range(args.rounds):
            for c in levels:
                keyed = [request_body(model, workload, i, args.max_tokens, args.block) for i in range(max(16, c))]
                results, seconds = asyncio.run(load(url, [b for _, b in keyed], c, key))
                rates[c].append(sum(r["tokens"] for r in results) / seconds)
                for (ident, _), r in zip(keyed, results):
                    if texts.setdefault(ident, r["text"]) != r["text"]:
                        raise SystemExit(f"{workload}: text of {ident} differs at concurrency {c}")
        rate = {c: statistics.median(rates[c]) for c in levels}
        cells = [f"{rate[c]:.1f}" for c in levels] + [f"{rate[c] / rate[levels[0]]:.2f}x" for c in levels if c != 1]
        print(f"| {workload} | " + " | ".join(cells) + " | yes |", flush=True)


def prefix_table(url: str, model: str, args, key: str | None) -> None:
    shared = (REPO / "models" / "engine" / "scheduler.py").read_text()[: args.prefix_chars]
    print(f"\n## TTFT over HTTP with a shared {args.prefix_chars}-character prefix (one request at a time)\n")
    ttft: dict[str, list[float]] = {model: [], model + NO_CACHE: []}
    texts: dict[int, str] = {}
    for i in range(args.prefix_requests):
        for name in ttft:  # interleaved: caching on, off, on, off, ...
            body = {
                "model": name,
                "prompt": shared + f"\n# variant {i}\ndef f{i}(x):\n",
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
                "decoding": {"mode": "ar"},
            }
            (result,), _ = asyncio.run(load(url, [body], 1, key))
            if texts.setdefault(i, result["text"]) != result["text"]:
                raise SystemExit("prefix caching changed the text")
            if i:  # the first request fills the cache
                ttft[name].append(result["ttft"])
    on, off = (statistics.median(ttft[name]) for name in ttft)
    print("| prefix caching | TTFT p50 (ms) | identical text |")
    print("|---|---|---|")
    print(f"| on | {on * 1e3:.1f} | yes |")
    print(f"| off | {off * 1e3:.1f} | yes |")
    print(f"\nTTFT ratio off / on: {off / on:.2f}x")


def start_app(config_path: str | None, replicas: int, folder: Path) -> tuple[str, str, subprocess.Popen]:
    """The config's first model on ``replicas`` replicas, plus a no-prefix-cache copy of it, served by
    ``launch``."""
    raw = app_config(config_path)
    first = raw["models"][0]
    first["autoscaling"] = {**first.get("autoscaling", {}), "min_replicas": replicas, "max_replicas": replicas}
    raw["models"].insert(1, {**first, "name": first["name"] + NO_CACHE, "prefix_caching": False})
    url, server = launch(raw, folder)
    return url, first["name"], server


def app_config(config_path: str | None) -> dict:
    """An app YAML (default: the default app) as a mapping, model paths made absolute."""
    from deployments.config import DEFAULT_CONFIG

    source = Path(config_path) if config_path else DEFAULT_CONFIG
    raw = yaml.safe_load(source.read_text())
    for entry in raw["models"]:
        entry["path"] = str((source.parent / entry["path"]).resolve())
    return raw


def launch(raw: dict, folder: Path) -> tuple[str, subprocess.Popen]:
    """``triserve serve`` of the app config ``raw`` in its own process (the load comes from this one,
    as a client's would) on a free loopback port; its output goes to ``folder``/serve.log."""
    config = folder / "app.yaml"
    config.write_text(yaml.safe_dump(raw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    command = [sys.executable, "-m", "deployments.cli", "serve", "--config", str(config), "--port", str(port)]
    server = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=(folder / "serve.log").open("w"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url, server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    server.wait()
    # the log's end goes into the message: a caller's temporary folder may be gone by the time one reads it
    tail = "\n".join((folder / "serve.log").read_text(errors="replace").splitlines()[-40:])
    raise SystemExit(f"the app did not come up (exit status {server.returncode}); the end of its log:\n{tail}")


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)  # triserve serve shuts Serve and Ray down on SIGINT
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="an app already running on 127.0.0.1 (default: start one)")
    parser.add_argument("--config", default=None, help="app YAML to start (default: the default app)")
    parser.add_argument("--model", default=None, help="model name (default: the config's first)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the measured model (pinned)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--workloads", nargs="+", default=[*MODES, "mix"], choices=[*MODES, "mix"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prefix-chars", type=int, default=600)
    parser.add_argument("--prefix-requests", type=int, default=7)
    args = parser.parse_args()
    key = os.environ.get("TRISERVE_API_KEY")
    if args.url:
        if not args.url.startswith(("http://127.0.0.1", "http://localhost")):
            raise SystemExit("serve_load only targets a server on this machine (127.0.0.1)")
        measure(args.url, args.model or "tiny", args, key, prefix=False)
        return
    with tempfile.TemporaryDirectory() as folder:
        url, model, server = start_app(args.config, args.replicas, Path(folder))
        try:
            measure(url, args.model or model, args, key, prefix=True)
        finally:
            stop(server)


def measure(url: str, model: str, args, key: str | None, prefix: bool) -> None:
    for c in (1, 4):  # warm-up
        asyncio.run(load(url, [request_body(model, "mix", i, 8, args.block)[1] for i in range(4)], c, key))
    print(f"app at {url}, model {model}")
    throughput_table(url, model, args, key)
    if prefix:
        prefix_table(url, model, args, key)


if __name__ == "__main__":
    main()

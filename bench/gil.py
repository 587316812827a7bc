"""Why the engine steps in a process of its own: Python threads beside it take the GIL it needs.

    python bench/gil.py [--model models/bundled/tiny-code] [--requests 32] [--rounds 2]

In-process, no Ray: the engine runs the round-robin mix of the four modes at 16 requests at once,
alone and with ``--threads`` Python threads beside it that each do short bursts of pure-Python work
(``--burst-ms`` long, ``--duty`` of the time), roughly what Serve's event loops and serialisation
threads do in a replica. Every torch operation releases the GIL, so the stepping thread waits for
it after each of its operations whenever another thread holds it. Rounds interleaved, medians;
tokens are checked identical with and without the threads.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import statistics
import threading
import time

import torch

import models
from bench.engine_throughput import REPO, run, workload


def busy(stop: threading.Event, burst_s: float, duty: float) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < burst_s:
            sum(range(200))
        time.sleep(burst_s * (1 - duty) / duty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "bundled" / "tiny-code"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="busy Python threads beside the engine")
    parser.add_argument("--duty", type=float, default=0.3, help="share of the time each thread is busy")
    parser.add_argument("--burst-ms", type=float, default=0.6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = models.load_model(args.model)
    requests = workload(model.tokenizer, "mix", args.requests, args.max_tokens, args.block)
    run({}, model, requests[:8], 16)  # warm
    rates: dict[int, list[float]] = {0: [], args.threads: []}
    cpu: dict[int, list[float]] = {0: [], args.threads: []}
    tokens: dict[int, list[list[int]]] = {}
    for _ in range(args.rounds):
        for count in rates:
            stop = threading.Event()
            helpers = [
                threading.Thread(target=busy, args=(stop, args.burst_ms / 1000, args.duty)) for _ in range(count)
            ]
            for helper in helpers:
                helper.start()
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            seconds, out, _ = run({}, model, requests, 16)
            cpu[count].append((time.process_time() - cpu_start) / (time.perf_counter() - wall_start))
            stop.set()
            for helper in helpers:
                helper.join()
            rates[count].append(sum(map(len, out)) / seconds)
            tokens.setdefault(count, out)
    print(f"\n## mix at 16 requests in-process, with and without busy Python threads ({model.dtype})\n")
    print("| Python threads beside the engine | tok/s | process CPU (cores) | identical tokens |")
    print("|---|---|---|---|")
    for count in rates:
        label = f"{count} ({args.duty:.0%} busy in {args.burst_ms} ms bursts)" if count else "0"
        same = "yes" if tokens[count] == tokens[0] else "NO"
        print(f"| {label} | {statistics.median(rates[count]):.1f} | {statistics.median(cpu[count]):.2f} | {same} |")


if __name__ == "__main__":
    main()

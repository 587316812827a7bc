"""What sampling controls, logprobs and n cost in the engine (in-process, no Ray, no HTTP).

    python bench/sampling.py [--model models/bundled/tiny-code] [--requests 16] [--max-tokens 48] [--rounds 3]

1. tokens/s of 16 concurrent requests per mode with each feature on, as a ratio to the same
   requests without it, rounds interleaved (medians); in the same run, whether linear_spec and
   quadratic_spec emit exactly AR's tokens under the greedy controls (they must).
2. prompt tokens computed for n choices of one prompt (n requests with the same prompt submitted
   together), against n separate prefills, and the time to the last choice's first token.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import statistics
import time
from dataclasses import replace

import torch

import models
from models.controls import SamplingControls
from models.engine import Engine
from models.modes import DecodeParams

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Cache:\n    def __init__(self, size):\n",
    'def parse(text):\n    """Parse a config file."""\n',
    "for path in sorted(paths):\n    with open(path) as f:\n",
]
GREEDY_CONTROLS = SamplingControls(frequency_penalty=0.5, presence_penalty=0.2, repetition_penalty=1.2, min_tokens=8)
FEATURES = {
    "plain (greedy)": {},
    "penalties+min_tokens": {"controls": GREEDY_CONTROLS},
    "logit_bias (20 tokens)": {"controls": SamplingControls(logit_bias=tuple((t, -5.0) for t in range(100, 120)))},
    "logprobs=5": {"logprobs": 5},
    "T=1 (seeded)": {"temperature": 1.0},
    "T=1 top_p=0.9 top_k=40": {"temperature": 1.0, "controls": SamplingControls(top_p=0.9, top_k=40)},
}


def run(model, prompts: list[list[int]], params: list[DecodeParams]) -> tuple[float, list[list[int]]]:
    engine = Engine(model, num_pages=1024, max_running=len(prompts))
    states = [engine.add_request(str(i), p, q).state for i, (p, q) in enumerate(zip(prompts, params))]
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    return time.perf_counter() - start, [s.tokens for s in states]


def features_table(model, tokenizer, count: int, max_tokens: int, rounds: int) -> None:
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(count)]
    print(f"\n1. {count} concurrent requests, {max_tokens} tokens each (median of {rounds} interleaved rounds)")
    print("| mode | feature | tok/s | ratio to plain | spec tokens = AR |")
    print("|---|---|---|---|---|")
    for mode in ("ar", "linear_spec", "quadratic_spec"):
        times: dict[str, list[float]] = {name: [] for name in FEATURES}
        produced: dict[str, int] = {}
        for _ in range(rounds):
            for name, extra in FEATURES.items():
                params = [
                    DecodeParams(mode=mode, max_new_tokens=max_tokens, block_length=8, seed=i, **extra)
                    for i in range(count)
                ]
                seconds, tokens = run(model, prompts, params)
                times[name].append(seconds)
                produced[name] = sum(len(t) for t in tokens)
        same = ""
        if mode != "ar":
            ar = [DecodeParams(mode="ar", max_new_tokens=max_tokens, controls=GREEDY_CONTROLS) for _ in range(count)]
            spec = [replace(p, mode=mode, block_length=8) for p in ar]
            same = "yes" if run(model, prompts, ar)[1] == run(model, prompts, spec)[1] else "NO"
        base = produced["plain (greedy)"] / statistics.median(times["plain (greedy)"])
        for name in FEATURES:
            rate = produced[name] / statistics.median(times[name])
            shown = same if name == "penalties+min_tokens" else ""
            print(f"| {mode} | {name} | {rate:.0f} | {rate / base:.2f} | {shown} |")


def choices_table(model, tokenizer, max_tokens: int) -> None:
    prompt = tokenizer.encode("".join(PROMPTS) * 2)
    print(f"\n2. n choices of one {len(prompt)}-token prompt (T=1, {max_tokens} tokens each)")
    print("| n | prompt tokens computed | n separate prefills | time to the last first token (s) |")
    print("|---|---|---|---|")
    for n in (1, 4, 16):
        engine = Engine(model, num_pages=1024, max_running=n)
        params = DecodeParams(mode="ar", max_new_tokens=max_tokens, temperature=1.0)
        states = [engine.add_request(str(i), prompt, replace(params, seed=i)).state for i in range(n)]
        start, first = time.perf_counter(), None
        while engine.has_work:
            engine.step()
            if first is None and all(s.tokens for s in states):
                first = time.perf_counter() - start
        computed = len(prompt) * n - engine.stats.prefix_hits
        print(f"| {n} | {computed} | {len(prompt) * n} | {first:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "bundled" / "tiny-code"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = models.load_model(args.model)
    models.warm_up(model)
    print(f"model {args.model}, {model.dtype}, 1 thread")
    features_table(model, model.tokenizer, args.requests, args.max_tokens, args.rounds)
    choices_table(model, model.tokenizer, args.max_tokens)


if __name__ == "__main__":
    main()

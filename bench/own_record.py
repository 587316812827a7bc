"""A lone speculative request with and without the engine's judgement of its own cycles.

    python bench/own_record.py --model PATH [--heldout] [--options linear_spec@32 ...] [--rounds 3]

Under ``speculation_max_batch="auto"`` (the default) a speculative request whose recent cycles
predict less than 0.9x AR's tokens/s takes AR steps for a while (models/modes/base.py,
``SpeculationRecord``); with ``None`` it speculates whatever its drafts yield. The costs it is
judged by are the option's and AR's figures, which a replica takes from ``triserve calibrate``: this
script calibrates AR and the options first (``models.calibration.calibrate``, figures printed), then
decodes every prompt greedily, one request at a time, on engines with the rule on and off and with
AR, interleaved round after round. It prints tok/s (medians over rounds), the ratio of on to off
and to AR in the same round, the share of steps the rule turned into AR steps, and checks that
every run decoded AR's tokens.
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
from bench.tpf import FIXTURE, fixture_prompts, heldout_prompts
from models.calibration import calibrate
from models.engine import Engine
from models.engine.costs import split_option
from models.modes import DecodeParams


def decode(model, priors, rule, prompts, mode: str, block: int | None, max_new_tokens: int):
    """Every prompt alone on a fresh engine: (outputs, seconds, demoted steps, forwards)."""
    outputs, seconds, demoted, forwards = [], 0.0, 0, 0
    params = DecodeParams(mode=mode, max_new_tokens=max_new_tokens, block_length=block)
    for prompt in prompts:
        engine = Engine(model, num_pages=64, priors=priors, speculation_max_batch=rule)
        state = engine.add_request("r", prompt, params).state
        start = time.perf_counter()
        while engine.has_work:
            engine.step()
        seconds += time.perf_counter() - start
        outputs.append(state.tokens)
        demoted += state.demoted_steps
        forwards += state.nfe
    return outputs, seconds, demoted, forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--heldout", action="store_true", help="held-out code prompts (else the fixture's)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--options", nargs="+", default=["linear_spec@32", "linear_spec@8", "quadratic_spec@32"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = models.load_model(args.model)
    prompts = heldout_prompts(model.tokenizer, args.prompts, args.prompt_length) if args.heldout else fixture_prompts()
    blocks = tuple(sorted({split_option(o)[1] for o in args.options}))
    priors = calibrate(model, blocks=blocks, rounds=2)
    for key in ["ar", *args.options]:
        f = priors[key]
        print(f"calibrated {key}: step {f.step_s * 1e3:.2f} ms, TPF {f.tpf:.2f}")
    ar_tps: list[float] = []
    table = {o: {"on": [], "off": [], "x_off": [], "x_ar": [], "demoted": [0, 0]} for o in args.options}
    for r in range(args.rounds):
        reference, seconds, _, _ = decode(model, priors, "auto", prompts, "ar", None, args.max_new_tokens)
        tokens = sum(map(len, reference))
        ar_tps.append(tokens / seconds)
        for option in args.options:
            mode, block = split_option(option)
            runs = {}
            for rule in ("auto", None) if r % 2 == 0 else (None, "auto"):
                outputs, seconds, demoted, forwards = decode(
                    model, priors, rule, prompts, mode, block, args.max_new_tokens
                )
                assert outputs == reference, f"{option} (rule {rule}) did not decode AR's tokens"
                runs[rule] = tokens / seconds
                if rule == "auto":
                    table[option]["demoted"][0] += demoted
                    table[option]["demoted"][1] += forwards
            row = table[option]
            row["on"].append(runs["auto"])
            row["off"].append(runs[None])
            row["x_off"].append(runs["auto"] / runs[None])
            row["x_ar"].append((runs["auto"] / ar_tps[-1], runs[None] / ar_tps[-1]))
    med = statistics.median
    print(f"\nAR: {med(ar_tps):.1f} tok/s; {args.rounds} rounds, {len(prompts)} prompts, every run AR's tokens\n")
    print("| option | rule off tok/s (x AR) | rule on tok/s (x AR) | on / off | forwards the rule made AR steps |")
    print("|---|---|---|---|---|")
    for option, row in table.items():
        on_ar = med(x for x, _ in row["x_ar"])
        off_ar = med(y for _, y in row["x_ar"])
        print(
            f"| {option} | {med(row['off']):.1f} ({off_ar:.2f}x) | {med(row['on']):.1f} ({on_ar:.2f}x) "
            f"| {med(row['x_off']):.2f}x | {row['demoted'][0] / row['demoted'][1]:.0%} |"
        )


if __name__ == "__main__":
    main()

"""Tokens per forward, speed and agreement with AR for every decoding mode.

    python bench/tpf.py --model PATH [--heldout] [--max-new-tokens 128] [--prompts N] [--rounds R]

Default prompts: the fixture's public prompts. ``--heldout`` cuts prompts from held-out standard
library modules (names starting with t-z), and also prints the AR loss in bits per byte over
those modules and the distinct-4-gram ratio of each mode's output (a repetitive model makes TPF
look good while meaning nothing). The speculative modes also report their mean accepted length
(tokens emitted per verified draft, the bonus token included); ``--branches`` sets quadratic's.
``--int8-drafts`` adds a row per speculative mode whose drafts multiply in int8 (``TriModeModel.int8_drafts``;
the model must take them here). ``--device cuda`` runs the model on a GPU (bench/gpu_check.sh).
Options are interleaved prompt by prompt (each prompt is decoded by every option in turn, so that a
drift of the machine's speed hits all of them alike); with ``--rounds R`` that is repeated R times,
tok/s and its ratio to AR in the same round ("x AR") are medians over the rounds ("rounds": the
lowest and highest ratio), and every round must decode the same tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import math
import random
import statistics
import sysconfig
import time
from dataclasses import dataclass

import torch

import models
from models.generate import Generation
from models.native_forward import drafts_in_int8

FIXTURE = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "tiny-trimode-code"
CONFIGS = [
    ("ar", {}),
    ("diffusion", {"threshold": 0.9}),
    ("diffusion", {"threshold": 0.7}),
    ("diffusion", {"threshold": 0.5}),
    ("linear_spec", {}),
    ("quadratic_spec", {}),
]


def heldout_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("[t-z]*.py") if not p.name.startswith("test"))


def heldout_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for path in rng.sample(heldout_files(), count):
        ids = tokenizer.encode(path.read_text(errors="replace"), add_special_tokens=False)
        start = rng.randrange(0, max(1, len(ids) - length))
        prompts.append([tokenizer.bos_token_id] + ids[start : start + length])
    return prompts


def fixture_prompts() -> list[list[int]]:
    seen: dict[int, list[int]] = {}
    for line in (FIXTURE / "golden_public.jsonl").read_text().splitlines():
        record = json.loads(line)
        seen.setdefault(record["prompt_id"], record["prompt_ids"])
    return list(seen.values())


def bits_per_byte(model, max_bytes: int) -> float:
    """Summed AR negative log-likelihood over the UTF-8 bytes of held-out text (tokenizer-independent)."""
    tok = model.tokenizer
    nats, nbytes = 0.0, 0
    for path in heldout_files():
        text = path.read_text(errors="replace")
        ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
        window = model.config.max_position_embeddings
        for start in range(0, len(ids) - 1, window - 1):
            piece = ids[start : start + window]
            nats -= sum(models.score(model, piece))
        nbytes += len(text.encode())
        if nbytes >= max_bytes:
            break
    return nats / math.log(2) / nbytes


def distinct4(tokens: list[int]) -> float:
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--heldout", action="store_true")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--branches", type=int, default=None, help="quadratic_spec: acceptance lengths drafted ahead")
    parser.add_argument("--bpb-bytes", type=int, default=200_000, help="held-out bytes scored for bits/byte")
    parser.add_argument("--modes", nargs="+", default=None, help="only these modes (ar always runs: the reference)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (tok/s and x AR: medians)")
    parser.add_argument("--int8-drafts", action="store_true", help="also each speculative mode with int8 drafts")
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda: a GPU's forwards)")
    args = parser.parse_args()

    model = models.load_model(args.model, device=args.device)
    if args.int8_drafts:
        model.int8_drafts = True
        with torch.inference_mode():
            if not drafts_in_int8(model):
                raise SystemExit("--int8-drafts: this model's drafts cannot take the int8 products on this machine")
        model.int8_drafts = False
    if args.heldout:
        prompts = heldout_prompts(model.tokenizer, args.prompts, args.prompt_length)
        if args.bpb_bytes:
            print(f"held-out AR loss: {bits_per_byte(model, args.bpb_bytes):.3f} bits/byte")
    else:
        prompts = fixture_prompts()
    print(f"model {args.model}: {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, {args.rounds} round(s)")
    configs = [(m, e) for m, e in CONFIGS if args.modes is None or m == "ar" or m in args.modes]
    if args.int8_drafts:
        configs += [(m, {**e, "int8_drafts": True}) for m, e in configs if m.endswith("_spec")]
    options = [(mode, {**extra, **({"branches": args.branches} if mode == "quadratic_spec" else {})})
               for mode, extra in configs]  # fmt: skip
    for mode, knobs in options:  # a first forward of each builds what it needs (compiled kernels), untimed
        decode(model, prompts[0], mode, knobs, args, max_new_tokens=1)
    runs: dict[int, list[Run]] = {i: [] for i in range(len(configs))}
    for _ in range(args.rounds):
        for i in runs:
            runs[i].append(Run([], 0, 0, 0.0, []))
        for prompt in prompts:  # every option in turn, so that the machine's drift hits all alike
            for i, (mode, knobs) in enumerate(options):
                runs[i][-1].add(decode(model, prompt, mode, knobs, args))
    header = f"{'mode':<24}{'TPF':>7}{'tok/s':>9}{'x AR':>7}{'rounds':>12}"
    header += f"{'agree w/ AR':>13}{'distinct-4':>12}{'accepted':>10}"
    print(header)
    print("-" * len(header))
    ar_runs = runs[0]
    for i, (mode, extra) in enumerate(configs):
        first = runs[i][0]
        if any(r.outputs != first.outputs for r in runs[i]):
            raise SystemExit(f"{mode}: rounds decoded different tokens")
        agree = compared = 0
        for ref, out in zip(ar_runs[0].outputs, first.outputs):
            agree += sum(a == b for a, b in zip(ref, out))
            compared += max(len(ref), len(out))
        speed = statistics.median(r.tokens / r.seconds for r in runs[i])
        ratios = [(r.tokens / r.seconds) / (a.tokens / a.seconds) for r, a in zip(runs[i], ar_runs)]
        ratio, spread = statistics.median(ratios), f"{min(ratios):.2f}-{max(ratios):.2f}"
        d4 = statistics.mean(distinct4(out) for out in first.outputs)
        name = mode + (f" t={extra['threshold']}" if "threshold" in extra else "")
        name += " int8" if extra.get("int8_drafts") else ""
        mean_accepted = f"{statistics.mean(first.accepted):.2f}" if first.accepted else "-"
        print(
            f"{name:<24}{first.tokens / first.nfe:>7.2f}{speed:>9.1f}{ratio:>7.2f}{spread:>12}{agree / compared:>13.1%}"
            f"{d4:>12.2f}{mean_accepted:>10}"
        )


@dataclass
class Run:
    """One option over every prompt: its outputs and what they cost."""

    outputs: list[list[int]]
    tokens: int
    nfe: int
    seconds: float
    accepted: list[int]

    def add(self, timed: tuple[Generation, float]) -> None:
        out, seconds = timed
        self.outputs.append(out.tokens)
        self.tokens += len(out.tokens)
        self.nfe += out.nfe
        self.seconds += seconds
        self.accepted += out.accepted_lengths


def decode(model, prompt: list[int], mode: str, knobs: dict, args: argparse.Namespace,
           max_new_tokens: int | None = None) -> tuple[Generation, float]:  # fmt: skip
    """One prompt in one option, and the seconds it took. The native forward's products for the option's
    ``int8_drafts`` setting are made ready before the clock starts (built once per setting, about 20 ms on
    a CPU; models.native_forward.decoder_for keeps them)."""
    knobs = dict(knobs)
    model.int8_drafts = knobs.pop("int8_drafts", False)
    with torch.inference_mode():
        drafts_in_int8(model)
    start = time.perf_counter()
    out = models.generate(
        model, prompt, mode=mode, max_new_tokens=max_new_tokens or args.max_new_tokens,
        block_length=args.block_length, **knobs,
    )  # fmt: skip
    return out, time.perf_counter() - start


if __name__ == "__main__":
    main()

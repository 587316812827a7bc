"""What revision buys diffusion: AR log-likelihood of the text against forwards, with and without it.

    python bench/revision.py [--model models/bundled/tiny-code] [--prompts 16] [--png bench/revision.png]

Held-out prompts (bench/tpf.py's), greedy diffusion at block 32, threshold 0.9, for each
``max_steps`` in --steps with ``revise`` off and at each --revise threshold (at most --passes
re-masking passes per block). Quality is the AR model's own mean log-probability per token of what
diffusion wrote, given the prompt (``models.score``); cost is the forwards taken (NFE, revision's
extra passes included), so the curves compare the two at equal numbers of forwards. Prints the table
and, with matplotlib installed, plots quality against NFE per block.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import statistics

import models
from bench.tpf import heldout_prompts

REPO = Path(__file__).resolve().parent.parent


def measure(model, prompts, max_new: int, steps: int, revise: float | None, passes: int) -> tuple[float, float]:
    """(mean AR log-probability per generated token, forwards per block)."""
    logprobs, forwards, blocks = [], 0, 0
    for prompt in prompts:
        out = models.generate(
            model,
            prompt,
            mode="diffusion",
            max_new_tokens=max_new,
            block_length=32,
            max_steps=steps,
            revise=revise,
            revise_passes=passes,
        )
        scored = models.score(model, prompt + out.tokens)[len(prompt) - 1 :]
        logprobs.append(sum(scored) / max(len(scored), 1))
        forwards += out.nfe
        blocks += -(-len(out.tokens) // 32)
    return statistics.mean(logprobs), forwards / max(blocks, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "bundled" / "tiny-code"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--revise", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--png", default=str(REPO / "bench" / "revision.png"))
    args = parser.parse_args()
    model = models.load_model(args.model)
    prompts = heldout_prompts(model.tokenizer, args.prompts, 96)
    arms = [None, *args.revise]
    rows = {
        arm: [measure(model, prompts, args.max_new_tokens, s, arm, args.passes) for s in args.steps] for arm in arms
    }
    print(f"{args.prompts} held-out prompts, {args.max_new_tokens} new tokens, block 32, {args.model}\n")
    print("| max_steps | " + " | ".join("no revision" if a is None else f"revise {a}" for a in arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    for i, steps in enumerate(args.steps):
        cells = [f"{rows[a][i][0]:.3f} nats @ {rows[a][i][1]:.1f} fwd" for a in arms]
        print(f"| {steps} | " + " | ".join(cells) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        ax.plot(
            [r[1] for r in rows[arm]],
            [r[0] for r in rows[arm]],
            marker="o",
            label="no revision" if arm is None else f"revise < {arm} ({args.passes} passes max)",
        )
    ax.set_xlabel("forwards per 32-token block (NFE)")
    ax.set_ylabel("AR log-likelihood per token (nats)")
    ax.set_title("Diffusion quality against forwards, held-out code")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()

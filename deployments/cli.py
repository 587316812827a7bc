"""The ``triserve`` command line."""

from __future__ import annotations

import argparse
import sys
import time

from models.modes import MODES


def _generate(args: argparse.Namespace) -> int:
    import models

    model = models.load_model(args.model, dtype=args.dtype)
    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer files", file=sys.stderr)
        return 2
    prompt = model.tokenizer.encode(args.prompt)
    start = time.perf_counter()
    out = models.generate(
        model,
        prompt,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        block_length=args.block_length,
        threshold=args.threshold,
        max_steps=args.max_steps,
        temperature=args.temperature,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    print(model.tokenizer.decode(out.tokens, skip_special_tokens=True))
    print(
        f"[{args.mode}] tokens={len(out.tokens)} nfe={out.nfe} tpf={out.tpf:.2f} "
        f"tokens/s={len(out.tokens) / elapsed:.1f} finish={out.finish_reason}",
        file=sys.stderr if args.quiet_stats else sys.stdout,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triserve", description="Serve tri-mode diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="decode one prompt and print the text and decoding statistics")
    gen.add_argument("--model", required=True, help="checkpoint folder (official Hugging Face layout)")
    gen.add_argument("--mode", choices=MODES, default="ar")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--block-length", type=int, default=None, help="default: the checkpoint's block_size")
    gen.add_argument("--threshold", type=float, default=0.9, help="diffusion confidence threshold")
    gen.add_argument("--max-steps", type=int, default=None, help="diffusion: most denoise passes per block")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: from config.json)")
    gen.add_argument("--quiet-stats", action="store_true", help="print the statistics line to stderr")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

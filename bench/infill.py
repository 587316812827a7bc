"""Infilling on held-out code: restore a removed line with the suffix in sight, against AR without it.

    python bench/infill.py [--model models/bundled/tiny-code] [--cases 200] [--max-middle 16]

Cases: held-out standard library modules (names t-z, as bench/tpf.py), one line from inside a
function body (neither its first nor its last line), 2 to 16 tokens, cut at token boundaries: the
prefix ends with the token that holds the line's leading newline and indentation, the middle is the
line's own tokens, the suffix starts with the next line's newline token (so both arms see the
tokenisation the model was trained on). Up to 192 tokens of prefix, 64 of suffix.

Per case: ``models.infill`` (diffusion, threshold 0.9, lengths 1..max-middle, the best rated kept)
and AR greedy from the prefix alone (its first line). Prints the mean difflib ratio of the restored
line to the true one and how many lines each restores exactly (whitespace-stripped).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import ast
import difflib
import random
import time

import models
from bench.tpf import heldout_files
from models.infill import infill

REPO = Path(__file__).resolve().parent.parent


def line_cases(tokenizer, count: int, max_middle: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prefix, middle, suffix) token lists, at most one case per function."""
    rng = random.Random(seed)
    cases = []
    files = heldout_files()
    rng.shuffle(files)
    for path in files:
        source = path.read_text(errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines(keepends=True)
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno >= 4]
        rng.shuffle(functions)
        for fn in functions[:10]:
            start = max(fn.lineno - 8, 0)  # a little context before the def
            text = "".join(lines[start : fn.end_lineno])
            ids = tokenizer.encode(text, add_special_tokens=False)
            pieces = [tokenizer.decode([t]) for t in ids]
            breaks = [i for i, p in enumerate(pieces) if "\n" in p]
            # lines between two newline tokens, inside the body: skip the def's and the last one
            body = [(a, b) for a, b in zip(breaks, breaks[1:]) if "def " not in "".join(pieces[max(a - 3, 0) : b])]
            spans = [(a + 1, b) for a, b in body[1:-1] if 2 <= b - a - 1 <= max_middle]
            spans = [
                (a, b)
                for a, b in spans
                if "".join(pieces[a:b]).strip() and not "".join(pieces[a:b]).strip().startswith("#")
            ]
            if not spans:
                continue
            a, b = rng.choice(spans)
            prefix = [tokenizer.bos_token_id] + ids[max(a - 192, 0) : a]
            cases.append((prefix, ids[a:b], ids[b : b + 64]))
            if len(cases) >= count:
                return cases
    return cases


def first_line(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "bundled" / "tiny-code"))
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--max-middle", type=int, default=16)
    args = parser.parse_args()
    model = models.load_model(args.model)
    tok = model.tokenizer
    cases = line_cases(tok, args.cases, args.max_middle)
    ratio = {"infill": 0.0, "ar": 0.0}
    exact = {"infill": 0, "ar": 0}
    nfe = 0
    start = time.perf_counter()
    for prefix, middle, suffix in cases:
        truth = first_line(tok, middle)
        filled = infill(model, prefix, suffix, args.max_middle)
        ar = models.generate(model, prefix, max_new_tokens=args.max_middle + 8)
        nfe += filled.nfe
        for arm, tokens in (("infill", filled.tokens), ("ar", ar.tokens)):
            line = first_line(tok, tokens)
            ratio[arm] += difflib.SequenceMatcher(None, line, truth).ratio()
            exact[arm] += line == truth
    n = len(cases)
    print(f"{n} cases from held-out code, {args.model}, {time.perf_counter() - start:.0f} s\n")
    print("| arm | mean difflib ratio | lines restored exactly |")
    print("|---|---|---|")
    print(f"| AR, prefix only (first line) | {ratio['ar'] / n:.3f} | {exact['ar']} |")
    print(f"| infill, suffix in sight | {ratio['infill'] / n:.3f} | {exact['infill']} |")
    print(f"\ninfill - AR: {(ratio['infill'] - ratio['ar']) / n:+.3f} (target +0.10); {nfe / n:.0f} forwards per case")


if __name__ == "__main__":
    main()

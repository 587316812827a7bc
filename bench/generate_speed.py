"""Single-request speed of every mode: triserve against transformers and against an older checkout.

    python bench/generate_speed.py [--baseline PATH] [--threads 1 2] [--rounds 2] [--prompts 3]

One run, batch size 1, greedy, ``--max-new-tokens`` (128) new tokens, on the bundled ``tiny-code``
model (held-out prompts of 96 tokens) and on the fixture (its public prompts). For each model and
thread count, rows are measured interleaved, round after round (medians of the rounds):

- ``triserve``: this checkout, each mode and block length;
- ``transformers``: AR with Hugging Face transformers' ``generate`` on the same weights
  (``Ministral3ForCausalLM``, the tri-mode checkpoint renamed), in the dtype triserve computes in
  (the checkpoint's, except fp32 for a bf16 checkpoint on a CPU without bf16 instructions);
- ``baseline``: the same rows from another checkout (``--baseline``, e.g. a ``git worktree`` of
  an older main), run exactly as that checkout runs them (its own default dtype).

Every row runs in a fresh subprocess (load included, timed apart) so that the checkouts do not
share a process. Token identity is checked in the run: the speculative modes against this
checkout's AR, transformers against it too, and each baseline row against the same row here.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import statistics
import subprocess

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "tiny-trimode-code"
BUNDLED = ROOT / "models" / "bundled" / "tiny-code"
ROWS = [
    ("ar", None),
    ("diffusion", None),
    ("linear_spec", None),
    ("linear_spec", 8),
    ("quadratic_spec", 8),
    ("quadratic_spec", 32),
]

# Runs in a subprocess with the checkout under test first on sys.path; uses only the API that
# every checkout has (models.load_model, models.generate, bench.tpf's prompt sets).
WORKER = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["repo"])
import torch
torch.set_num_threads(spec["threads"])
start = time.perf_counter()
import models
from bench.tpf import fixture_prompts, heldout_prompts
model = models.load_model(spec["model"])  # transformers runs in the dtype triserve computes in
dtype = str(next(model.parameters()).dtype).replace("torch.", "")
if spec["fixture"]:
    prompts = fixture_prompts()[: spec["prompts"]]
else:
    prompts = heldout_prompts(model.tokenizer, spec["prompts"], 96)
if spec["engine"] == "transformers":
    from bench.generate_speed import as_transformers
    model = as_transformers(model)
load = time.perf_counter() - start
outputs, nfe, seconds = [], 0, 0.0
for prompt in prompts:
    start = time.perf_counter()
    if spec["engine"] == "transformers":
        with torch.inference_mode():
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=spec["max_new"], do_sample=False)[0]
        tokens = ids[len(prompt):].tolist()
        if model.config.eos_token_id in tokens:
            tokens = tokens[: tokens.index(model.config.eos_token_id) + 1]
        nfe += len(tokens)
    else:
        out = models.generate(model, prompt, mode=spec["mode"], max_new_tokens=spec["max_new"],
                              block_length=spec["block"])
        tokens = out.tokens
        nfe += out.nfe
    seconds += time.perf_counter() - start
    outputs.append(tokens)
print(json.dumps({"outputs": outputs, "nfe": nfe, "seconds": seconds, "load": load, "dtype": dtype}))
"""


def as_transformers(model):
    """The tri-mode checkpoint as transformers' ``Ministral3ForCausalLM`` (its AR mode)."""
    from transformers import Ministral3Config, Ministral3ForCausalLM

    cfg = model.config
    rope = {k: v for k, v in cfg.rope.to_dict().items() if v is not None}
    rope.setdefault("llama_4_scaling_beta", 0.0)  # transformers always applies it: 0 leaves queries unscaled
    rope.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
    hf_config = Ministral3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        rope_parameters=rope,
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "sdpa"
    hf = Ministral3ForCausalLM(hf_config).to(model.dtype).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        state[name.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head")] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


def run_row(engine: str, repo: Path, model: Path, mode: str, block: int | None, threads: int, args) -> dict:
    prompts = 1 if (mode == "quadratic_spec" and block == 32) else args.prompts  # 1056-row forwards
    spec = {
        "repo": str(repo),
        "engine": engine,
        "model": str(model),
        "fixture": model == FIXTURE,
        "mode": mode,
        "block": block,
        "threads": threads,
        "prompts": prompts,
        "max_new": args.max_new_tokens,
    }
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True, env=env, cwd=repo
    )
    if done.returncode:
        raise RuntimeError(f"{engine} {mode} {block} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, b):
        same += sum(p == q for p, q in zip(x, y))
        total += max(len(x), len(y))
    return same / total if total else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to measure beside this one")
    parser.add_argument("--models", nargs="+", type=Path, default=[BUNDLED, FIXTURE])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows, as mode or mode:block")
    args = parser.parse_args()
    rows = [r for r in ROWS if args.rows is None or r[0] in args.rows or f"{r[0]}:{r[1]}" in args.rows]
    for model in args.models:
        for threads in args.threads:
            plan = [("triserve", ROOT, mode, block) for mode, block in rows]
            plan.insert(1, ("transformers", ROOT, "ar", None))
            if args.baseline:
                plan += [("baseline", args.baseline.resolve(), mode, block) for mode, block in rows]
            results: dict[tuple, list[dict]] = {}
            for _ in range(args.rounds):
                for engine, repo, mode, block in plan:
                    result = run_row(engine, repo, model, mode, block, threads, args)
                    results.setdefault((engine, mode, block), []).append(result)
            print(f"\n### {model.name}, {threads} thread(s), {args.max_new_tokens} new tokens, {args.rounds} rounds")
            print("| engine | mode | block | dtype | tok/s | TPF | load s | same tokens as |")
            print("|---|---|---|---|---|---|---|---|")
            ar = results[("triserve", "ar", None)][0]["outputs"]
            speed = {}
            for (engine, mode, block), runs in results.items():
                tokens = sum(len(o) for o in runs[0]["outputs"])
                tps = statistics.median(tokens / r["seconds"] for r in runs)
                speed[(engine, mode, block)] = tps
                tpf = tokens / runs[0]["nfe"] if runs[0]["nfe"] else 0.0
                if engine == "baseline":
                    ours = results.get(("triserve", mode, block))
                    same = f"triserve {agreement(runs[0]['outputs'], ours[0]['outputs']):.1%}" if ours else "-"
                elif mode == "diffusion":
                    same = "- (not AR)"
                else:
                    n = len(runs[0]["outputs"])
                    same = f"triserve ar {agreement(runs[0]['outputs'], ar[:n]):.1%}"
                load = statistics.median(r["load"] for r in runs)
                print(
                    f"| {engine} | {mode} | {block or 'default'} | {runs[0]['dtype']} | {tps:.1f} | {tpf:.2f} "
                    f"| {load:.1f} | {same} |"
                )
            if args.baseline:
                print("\n| mode | block | triserve / baseline |")
                print("|---|---|---|")
                for mode, block in rows:
                    print(
                        f"| {mode} | {block or 'default'} | "
                        f"{speed[('triserve', mode, block)] / speed[('baseline', mode, block)]:.2f}x |"
                    )
            hf = speed[("transformers", "ar", None)]
            print(f"\nAR: triserve / transformers = {speed[('triserve', 'ar', None)] / hf:.2f}x")


if __name__ == "__main__":
    main()

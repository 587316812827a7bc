"""The cost of one forward per mode and block length: what the router trades against TPF.

    python bench/forward.py [--device cpu|cuda] [--model PATH] [--blocks 4 8 16 32] [--context N]

Cases, batch size 1, after ``--context`` cached tokens: an AR token; per block length L a draft
block (bidirectional, L rows), a verify block (causal, L rows), a sparse quadratic cycle (the
default branch count: L * 2 rows), the same once its verify window has shrunk to ``WINDOW`` draft
tokens (WINDOW + 1 + L rows), and a dense one (every acceptance length: L * (L + 1) rows). Each
is reported in ms and relative to the AR token: on a compute-bound CPU a block costs many AR
steps, on a bandwidth-bound GPU about one, which is why block length is chosen per device.

CPU (default without a GPU): the bundled ``tiny-code`` model unless ``--model`` names another, in
the dtype serving computes it in (the loader's rule: the checkpoint's bf16 where the CPU computes
bf16 in hardware, fp32 elsewhere) unless ``--dtype`` forces one, ``--threads`` threads, medians of
``--reps`` runs. Draft blocks (and quadratic cycles' branches) run through the model's draft
adapter where it has one, as served; the draft block's logits are those of its rows after the
first, as a linear-spec draft reads them. GPU: an 8B-shaped model with
random weights (``--layers``) in bf16, timed with ``triton.testing.do_bench``, plus the bandwidth
floor (weight bytes read once divided by the measured copy bandwidth), and each case again as an
engine step replaying its CUDA graph (``models.engine.step_graphs``; the step's host work included;
"eager" where a step that large is not graphed).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import statistics
import time
from functools import partial

import torch

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "bundled" / "tiny-code"
WINDOW = 7  # draft tokens a windowed verify checks (DecodeState.verify_window after cycles of 2-4 tokens)


def eight_b_shaped(layers: int):
    from models.config import ModelConfig
    from models.model import TriModeModel

    config = ModelConfig.from_dict(
        {
            "model_type": "nemotron_labs_diffusion",
            "vocab_size": 131072,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": layers,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "mask_token_id": 100,
            "eos_token_id": 11,
            "block_size": 32,
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 16.0,
                "original_max_position_embeddings": 16384,
                "llama_4_scaling_beta": 0.1,
            },
            "torch_dtype": "bfloat16",
        }
    )
    with torch.device("cuda"):
        return TriModeModel(config).to(torch.bfloat16).eval()


def cpu_time_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="checkpoint folder (CPU default: the bundled tiny-code)")
    parser.add_argument("--blocks", nargs="+", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--context", type=int, default=None, help="cached tokens (default 96 on CPU, 4096 on GPU)")
    parser.add_argument("--layers", type=int, default=34, help="GPU: layers of the 8B-shaped model")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--reps", type=int, default=20, help="CPU: timed runs per case")
    parser.add_argument("--profile", action="store_true", help="CUDA: the kernels of the AR token and longest verify")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="CPU: force a dtype (default: the loader's)")
    args = parser.parse_args()

    import models
    from models.batch import pack
    from models.engine import KVCacheManager
    from models.engine.step_graphs import StepGraphs
    from models.modes.base import Plan, draft_segment
    from models.modes.quadratic_spec import DEFAULT_BRANCHES, cycle_segments
    from models.segments import causal_segment

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda needs a CUDA GPU (none found); nothing to measure.")
            return 0
        import triton.testing

        model = models.load_model(args.model, device="cuda") if args.model else eight_b_shaped(args.layers)
        context = args.context or 4096
        timer = partial(triton.testing.do_bench, warmup=5, rep=30)
    else:
        torch.set_num_threads(args.threads)
        model = models.load_model(args.model or BUNDLED, dtype=args.dtype)
        context = args.context or 96
        timer = partial(cpu_time_ms, reps=args.reps)
    longest = context + 2 * max(args.blocks) + 1
    if longest > model.config.max_position_embeddings + 1100:
        print(f"context {context} plus the largest cycle exceeds what the model's cache is sized for")
        return 2
    pages = longest // 16 + 2
    cache = model.new_cache(num_pages=pages, page_size=16)
    kv = KVCacheManager(pages, 16, device=args.device)
    kv.add(0)
    kv.reserve(0, longest)
    kv.set_length(0, context)
    mask = model.config.mask_token_id
    cases = [("AR token", [causal_segment([5], context, write=True)])]
    for block in args.blocks:
        sparse = list(range(min(DEFAULT_BRANCHES, block)))
        cases += [
            (f"draft block ({block})", [draft_segment(5, context, block, mask)]),
            (f"verify block ({block})", [causal_segment([5] * block, context, write=True)]),
            (
                f"quadratic cycle ({block}, sparse)",
                cycle_segments([5] * block, context, block, sparse, [5] * len(sparse), mask, block - 1),
            ),
            (
                f"quadratic cycle ({block}, dense)",
                cycle_segments([5] * block, context, block, list(range(block)), [5] * block, mask, block - 1),
            ),
        ]
        if block > WINDOW:  # a cycle once the verify window has shrunk to about what the bundled model accepts
            cases.append(
                (
                    f"quadratic cycle ({block}, sparse, {WINDOW}-token window)",
                    cycle_segments([5] * (WINDOW + 1), context, block, sparse, [5] * len(sparse), mask, WINDOW),
                )
            )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    header = f"{args.device}, {weight_bytes / 1e6:.1f} MB of weights, context {context}"
    if args.device == "cuda":
        src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() / (timer(lambda: dst.copy_(src)) * 1e-3)
        floor_ms = weight_bytes / bandwidth * 1e3
        header += f", copy {bandwidth / 1e12:.2f} TB/s, floor {floor_ms:.2f} ms per forward"
        header += f" ({torch.cuda.get_device_name()})"
    else:
        header += f", {args.threads} thread(s), {str(model.dtype).removeprefix('torch.')}"
        header += ", draft adapter" if model.has_adapter else ""
    print(header)
    # on a GPU, each case also as an engine step replaying its CUDA graph (host work of the step included)
    graphs = StepGraphs(model, cache, kv, 1) if args.device == "cuda" else None
    graphed = " graphed ms | x AR token |" if graphs else ""
    print(f"| case | query rows | ms per forward | x AR token |{graphed}")
    print("|---|---|---|---|" + "---|---|" * bool(graphs))
    ar_ms = ar_graphed = None
    for name, segments in cases:
        batch = pack([(0, segment) for segment in segments], kv, device=args.device)
        ms = timer(partial(model, batch, cache))
        ar_ms = ar_ms or ms
        line = f"| {name} | {batch.num_tokens} | {ms:.2f} | {ms / ar_ms:.2f} |"
        step = [(0, Plan(segments, None), None)]
        if graphs is not None and graphs.run(step) is not None:  # the first run captures it
            graphed_ms = timer(partial(graphs.run, step))
            ar_graphed = ar_graphed or graphed_ms
            line += f" {graphed_ms:.3f} | {graphed_ms / ar_graphed:.2f} |"
        elif graphs is not None:
            line += " eager | |"
        print(line)
    if args.profile and args.device == "cuda":
        longest_verify = f"verify block ({max(args.blocks)})"
        for name, segments in cases:
            if name in ("AR token", longest_verify):
                print(f"\n{name}: the kernels of three forwards, by device time")
                print(kernel_table(partial(model, pack([(0, s) for s in segments], kv, device="cuda"), cache)))
    return 0


def kernel_table(fn, rows: int = 12) -> str:
    """torch.profiler's table of the device kernels that three calls of ``fn`` launch, costliest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)


if __name__ == "__main__":
    sys.exit(main())

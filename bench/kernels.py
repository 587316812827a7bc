"""Triton kernels at 8B shapes on a CUDA device, against the device's measured peaks.

    python bench/kernels.py [--contexts 1024 4096 16384] [--batches 1 32]
    python bench/kernels.py --tilings

For every kernel it prints the time (triton.testing.do_bench), the kernel's byte and FLOP floor,
and achieved = max(bytes / bandwidth, FLOPs / peak) / time, with bandwidth and peak measured on
the device (a large device copy, a large bf16 matmul). ``--tilings`` instead times the batch-invariant
matmul beside cuBLAS under candidate tilings (``compare_tilings``). Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script: the repository root goes first, not bench/ (whose kernels.py would shadow the package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
from functools import partial

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, BLOCK = 4096, 32, 8, 128, 131072, 32


def measure_peaks(bench) -> tuple[float, float]:
    """(bytes/s of a large device copy, bf16 matmul FLOP/s)."""
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() / (copy_ms * 1e-3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = bench(lambda: a @ b)
    return bandwidth, 2 * 8192**3 / (mm_ms * 1e-3)


def row(name: str, ms: float, nbytes: float, flops: float, bandwidth: float, peak: float) -> None:
    floor_ms = max(nbytes / bandwidth, flops / peak) * 1e3
    print(f"{name:<44}{ms:>9.3f}{nbytes / 1e6:>11.1f}{flops / 1e9:>11.1f}{floor_ms:>10.3f}{floor_ms / ms:>10.1%}")


# candidates for kernels.matmul.tiling: (block_m, block_n, block_k, num_warps, num_stages)
CANDIDATE_TILINGS = [
    (32, 32, 64, 4, 3),
    (32, 64, 64, 4, 3),
    (64, 32, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (64, 128, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 64, 128, 4, 3),
    (64, 32, 128, 4, 4),
]


def compare_tilings() -> int:
    """The batch-invariant product's time under each candidate tiling at the 8B's projection shapes and
    1, 32 and 1024 rows, and whether a row's bits stay the same at every row count under it (what a
    tiling must keep to be chosen): a table to pick ``kernels.matmul.tiling`` from on this device."""
    import triton.testing

    from kernels.matmul import Tiling, matmul_triton, tiling

    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    shapes = [("qkv", 6144), ("o", HIDDEN), ("gate_up", 28672), ("head", VOCAB)]
    counts = (1, 32, 1024)
    x = torch.randn(max(counts), HIDDEN, **bf16)
    weights = {label: torch.randn(n, HIDDEN, **bf16) / HIDDEN**0.5 for label, n in shapes}
    cublas = {
        (label, r): triton.testing.do_bench(partial(torch.nn.functional.linear, x[:r], w), warmup=5, rep=20)
        for label, w in weights.items()
        for r in counts
    }
    current = {tiling(n) for _, n in shapes}
    columns = [f"{label} {r}" for label, _ in shapes for r in counts]
    print("ms per product (cuBLAS, then each tiling); * marks a tiling kernels.matmul uses now")
    print("| tiling (m, n, k, warps, stages) | " + " | ".join(columns) + " | rows invariant |")
    print("|---|" + "---|" * len(columns) + "---|")
    print("| cuBLAS | " + " | ".join(f"{cublas[label, r]:.3f}" for label, _ in shapes for r in counts) + " | |")
    for candidate in CANDIDATE_TILINGS:
        launch = Tiling(*candidate)
        times, same = [], True
        for w in weights.values():
            full = matmul_triton(x, w, launch)
            same &= all(
                torch.equal(matmul_triton(x[s : s + r], w, launch), full[s : s + r])
                for r in (1, 7, 33, 64, 65, 300)
                for s in (0, 5)
            )
            times += [
                triton.testing.do_bench(partial(matmul_triton, x[:r], w, launch), warmup=5, rep=20) for r in counts
            ]
        mark = "*" if launch in current else ""
        print(f"| {candidate}{mark} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {'yes' if same else 'NO'} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tilings", action="store_true", help="only: the matmul under candidate tilings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (none found); nothing to measure.")
        return 0
    if args.tilings:  # the batch-invariant product beside cuBLAS, under each candidate tiling
        return compare_tilings()
    import triton.testing

    from kernels import AttentionMetadata, MaskKind
    from kernels.kv_write import kv_write_triton
    from kernels.rmsnorm import rmsnorm_triton
    from kernels.rope import rope_triton
    from kernels.row_stats import row_stats_triton
    from kernels.triton_segment_attention import segment_attention_triton
    from kernels.verify_accept import verify_accept_triton

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    bandwidth, peak = measure_peaks(bench)
    name = torch.cuda.get_device_name()
    print(f"device {name}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    print(f"{'kernel':<44}{'ms':>9}{'MB':>11}{'GFLOP':>11}{'floor ms':>10}{'achieved':>10}")
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    for batch in args.batches:
        tokens = batch * BLOCK
        x = torch.randn(tokens, HIDDEN, **bf16)
        w = torch.ones(HIDDEN, **bf16)
        row(
            f"rmsnorm B={batch} x {BLOCK}", bench(partial(rmsnorm_triton, x, w, 1e-5)), 2 * x.nbytes, 0, bandwidth, peak
        )
        q = torch.randn(tokens, HEADS, HEAD_DIM, **bf16)
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, **bf16)
        cos, sin = torch.randn(tokens, HEAD_DIM, **bf16), torch.randn(tokens, HEAD_DIM, **bf16)
        row(
            f"rope B={batch} x {BLOCK}",
            bench(partial(rope_triton, q, k, cos, sin)),
            2 * (q.nbytes + k.nbytes),
            0,
            bandwidth,
            peak,
        )
        v = torch.randn_like(k)
        k_cache, v_cache = torch.empty_like(k), torch.empty_like(v)  # one slot per written row
        written = torch.arange(tokens, device="cuda")
        row(
            f"kv_write B={batch} x {BLOCK}",
            bench(partial(kv_write_triton, k_cache, v_cache, k, v, written, written.flip(0))),
            2 * (k.nbytes + v.nbytes),
            0,
            bandwidth,
            peak,
        )
        logits = torch.randn(tokens, VOCAB, dtype=torch.float32, device="cuda")
        row(
            f"row_stats B={batch} x {BLOCK} x {VOCAB}",
            bench(partial(row_stats_triton, logits, 100)),
            logits.nbytes,
            0,
            bandwidth,
            peak,
        )
        draft = torch.randint(0, VOCAB, (batch, BLOCK - 1), device="cuda")
        ar = torch.randint(0, VOCAB, (batch, BLOCK), device="cuda")
        row(
            f"verify_accept B={batch}",
            bench(partial(verify_accept_triton, draft, ar, 2)),
            draft.nbytes + ar.nbytes,
            0,
            bandwidth,
            peak,
        )
        for context in args.contexts:
            slots = batch * (context + BLOCK)
            k_cache = torch.randn(slots, KV_HEADS, HEAD_DIM, **bf16)
            v_cache = torch.randn_like(k_cache)
            segments = AttentionMetadata.from_slots(
                [
                    (i * BLOCK, BLOCK, torch.arange(i * context, (i + 1) * context, device="cuda"), MaskKind.CAUSAL)
                    for i in range(batch)
                ]
            )
            kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
            flops = 4 * batch * BLOCK * (context + BLOCK) * HEADS * HEAD_DIM
            row(
                f"segment_attention B={batch} block {BLOCK} ctx {context}",
                bench(partial(segment_attention_triton, q, k, v, k_cache, v_cache, segments, HEAD_DIM**-0.5)),
                kv_bytes + 2 * q.nbytes,
                flops,
                bandwidth,
                peak,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

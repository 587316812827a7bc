"""Benchmarks on a CPU-only machine: GPU-only ones say so and exit 0; the forward cost table runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this runs the real benchmark")
def test_gpu_kernel_benchmark_exits_cleanly_without_gpu():
    result = subprocess.run([sys.executable, "bench/kernels.py"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "needs a CUDA GPU" in result.stdout


def test_forward_cost_table_on_cpu():
    result = subprocess.run(
        [sys.executable, "bench/forward.py", "--device", "cpu", "--blocks", "4", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == [
        "AR token",
        "draft block (4)",
        "verify block (4)",
        "quadratic cycle (4, sparse)",
        "quadratic cycle (4, dense)",
    ]
    assert [int(row.split("|")[2]) for row in rows] == [1, 4, 4, 4 + 1 * 4, 4 + 4 * 4]
    assert all(float(row.split("|")[3]) > 0 for row in rows)

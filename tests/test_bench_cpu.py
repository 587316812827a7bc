"""GPU benchmarks say they need a GPU and exit 0 on a CPU-only machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these run the real benchmark")
@pytest.mark.parametrize("script", ["bench/kernels.py", "bench/forward.py"])
def test_gpu_benchmarks_exit_cleanly_without_gpu(script):
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "needs a CUDA GPU" in result.stdout

"""`triserve generate --tensor-parallel-size N`: one request on a local Ray group (gloo on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import models
from tests.conftest import REPO

TINY = REPO / "models" / "bundled" / "tiny-code"
PROMPT = "def fibonacci(n):"


def triserve_generate(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "deployments.cli", "generate", "--model", str(TINY), "--prompt", PROMPT, *extra]
    # the command starts its own local Ray and stops it before exiting
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)


def test_generate_tp2_prints_the_tp1_text(tmp_path):
    done = triserve_generate(
        tmp_path, "--tensor-parallel-size", "2", "--dtype", "float32", "--mode", "linear_spec", "--max-new-tokens", "24"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model = models.load_model(TINY, dtype=torch.float32)
    expected = models.generate(model, model.tokenizer.encode(PROMPT), mode="linear_spec", max_new_tokens=24)
    text = model.tokenizer.decode(expected.tokens, skip_special_tokens=True)
    assert done.stdout.startswith(text + "\n"), done.stdout
    assert f"tokens={len(expected.tokens)} nfe={expected.nfe} " in done.stdout


def test_generate_tp_size_that_does_not_divide_the_heads_is_a_clear_error(tmp_path):
    done = triserve_generate(tmp_path, "--tensor-parallel-size", "4")
    assert done.returncode == 2
    assert "num_key_value_heads (2) is not divisible by tensor_parallel_size (4)" in done.stderr

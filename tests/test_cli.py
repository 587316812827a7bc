"""The ``triserve generate`` command prints the text and a statistics line."""

from __future__ import annotations

import re
import subprocess
import sys


def test_generate_command(fixture_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployments.cli",
            "generate",
            "--model",
            str(fixture_path),
            "--mode",
            "linear_spec",
            "--prompt",
            "import os\ndef main():",
            "--max-new-tokens",
            "24",
            "--block-length",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    stats = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"\[linear_spec\] tokens=(\d+) nfe=(\d+) tpf=([\d.]+) tokens/s=([\d.]+) finish=\w+", stats)
    assert match, stats
    assert int(match.group(1)) == 24 and int(match.group(2)) >= 1


def test_generate_bad_mode_is_a_clear_error(fixture_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployments.cli",
            "generate",
            "--model",
            str(fixture_path),
            "--mode",
            "ar",
            "--prompt",
            "x",
            "--max-new-tokens",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2 and "max_new_tokens must be at least 1" in result.stderr

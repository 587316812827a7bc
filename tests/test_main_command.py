"""The README's main command: `triserve serve` with the default config answers a documented call."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from deployments.config import DEFAULT_CONFIG, load_config

pytestmark = pytest.mark.ray


def test_triserve_serve_default_config(tmp_path):
    config = load_config(DEFAULT_CONFIG)
    assert [m.name for m in config.models] == ["tiny", "tiny-vlm"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "TRISERVE_API_KEY": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        cwd=tmp_path,  # a separate Ray: its own session directory, stopped with the process
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        # the README's curl call
        curl = subprocess.run(
            [
                "curl",
                "-s",
                f"{base}/v1/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                '{"model": "tiny", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}',
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert '"text_completion"' in curl.stdout and '"triserve"' in curl.stdout, curl.stdout
        # the README's openai call
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        chat = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Write a function that adds two numbers."}],
            max_tokens=32,
            extra_body={"decoding": {"mode": "linear_spec"}},
        )
        assert chat.choices[0].message.content is not None and chat.model_extra["triserve"]["mode"] == "linear_spec"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0

"""Ray's own `serve run` accepts cluster/serve-cpu.yaml: the TP=2 app comes up and answers over HTTP.

`serve run` runs in a subprocess on a Ray of its own (started on 127.0.0.1 first, so the CLI joins
it); the config is the shipped file with only the HTTP port changed to a free one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
import yaml

import models
from tests.conftest import REPO
from tests.test_tensor_parallel import free_port

pytestmark = pytest.mark.slow

RUN = """
import sys
from cluster.local import ensure_ray
ensure_ray(num_cpus=2)
from ray.serve.scripts import run
run.main([sys.argv[1]], prog_name="serve run")
"""


def test_serve_run_deploys_the_cpu_config(tmp_path):
    config = yaml.safe_load((REPO / "cluster" / "serve-cpu.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TRISERVE_API_KEY": ""}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(tmp_path / "serve.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    body = {"model": "tiny", "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0}
    try:
        deadline = time.time() + 360  # Ray itself may take several 30 s tries to start on a loaded machine
        answer = None
        while time.time() < deadline and answer is None:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
                if resp.status_code == 200:
                    answer = resp.json()
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert answer is not None, "the app never answered"
        assert answer["object"] == "text_completion"
        reference = models.load_model(REPO / "models" / "bundled" / "tiny-code", dtype=torch.float32)
        expected = models.generate(reference, reference.tokenizer.encode(body["prompt"]), max_new_tokens=16)
        assert answer["choices"][0]["text"] == reference.tokenizer.decode(expected.tokens, skip_special_tokens=True)
    finally:
        if proc.poll() is None:  # it may have exited already: the assertion above says why
            os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve down; Ray stops with the process
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

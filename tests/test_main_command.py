"""The README's main command: `make serve` (`triserve serve` with the default config) answers the
documented calls, and a SIGTERM to make (what systemd, Docker and Kubernetes send) ends it cleanly:
an in-flight stream ends (finished, or with an error event), every process it started exits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from deployments.config import DEFAULT_CONFIG, load_config

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.ray


def test_triserve_serve_default_config(tmp_path):
    config = load_config(DEFAULT_CONFIG)
    assert [m.name for m in config.models] == ["tiny", "tiny-vlm"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "TRISERVE_API_KEY": ""}
    env.pop("RAY_ADDRESS")
    env.pop("RAY_worker_niceness", None)  # the session's Ray sets it; the command must set it itself
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            "make",
            "-s",
            "-C",
            str(REPO),
            "serve",
            f"SERVE_ARGS=--port {port}",
            f"VENV={Path(sys.executable).parent.parent}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # make and everything it starts in one process group, checked at the end
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        # the engines run at this process's niceness, not at Ray's 15 for workers (they are the work);
        # the routes answer once the ingress is up, which on a loaded machine can be before the model
        # replicas have started their engines
        engines = _engine_niceness(proc.pid)
        while len(engines) < len(config.models) and time.time() < deadline:
            time.sleep(1)
            engines = _engine_niceness(proc.pid)
        assert engines and set(engines) == {os.nice(0)}, engines
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
        # SIGTERM to make alone, while a stream is being decoded
        events: list[str] = []
        body = {"model": "tiny", "prompt": "def main():", "max_tokens": 200, "stream": True, "temperature": 0}

        def read_stream() -> None:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)

        reader = threading.Thread(target=read_stream)
        reader.start()
        while not events and reader.is_alive():
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        reader.join(timeout=90)
        assert not reader.is_alive(), "the in-flight stream hung after SIGTERM"
        assert events[-1] == "data: [DONE]" or '"error"' in events[-1], events[-3:]
        proc.wait(timeout=90)  # make, once the server it runs is gone (reaped here, not a zombie)
        gone = time.time() + 30
        while time.time() < gone and _group_alive(proc.pid):
            time.sleep(0.5)
        left = subprocess.run(["ps", "-o", "pid,stat,cmd", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        assert not _group_alive(proc.pid), f"processes of the server outlived SIGTERM:\n{left}"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert "shutting down" in (tmp_path / "serve.log").read_text()


def _engine_niceness(pgid: int) -> list[int]:
    """The niceness of every engine process in the process group ``pgid``."""
    listing = subprocess.run(["ps", "-o", "ni=,args=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "models.engine.engine_process" in line]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False

"""Shared fixtures: the official tiny checkpoint (from ../shared) and small random checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import models
from models.calibration import device_key, save_calibration
from models.config import ModelConfig
from models.engine.costs import CostFit, OptionStats
from models.loading import save_model
from models.model import TriModeModel

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores: avoid OpenMP oversubscription

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(os.environ.get("TRISERVE_FIXTURE", REPO.parent / "shared" / "fixtures" / "tiny-trimode-code"))


def fixture_or_skip() -> Path:
    if not (FIXTURE / "config.json").is_file():
        pytest.skip(f"official fixture not found at {FIXTURE} (set TRISERVE_FIXTURE to its folder)")
    return FIXTURE


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    return fixture_or_skip()


@pytest.fixture(scope="session")
def fixture_model(fixture_path):
    return models.load_model(fixture_path)


def read_golden(folder: Path) -> list[dict]:
    """The official reference's outputs shipped with a fixture (none where the file is missing)."""
    golden = folder / "golden_public.jsonl"
    if not golden.is_file():
        return []
    return [json.loads(line) for line in golden.read_text().splitlines() if line]


@pytest.fixture(scope="session")
def golden_records(fixture_path) -> list[dict]:
    return read_golden(fixture_path)


def tiny_config(**overrides) -> ModelConfig:
    raw = {
        "model_type": "nemotron_labs_diffusion",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "mask_token_id": 3,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "block_size": 8,
        "max_position_embeddings": 512,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "llama_4_scaling_beta": 0.1,
        },
        "torch_dtype": "float32",
    }
    raw.update(overrides)
    return ModelConfig.from_dict(raw)


def random_model(seed: int = 0, **overrides) -> TriModeModel:
    """A random tiny model; weights scaled up so its distributions are far from uniform."""
    torch.manual_seed(seed)
    model = TriModeModel(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3 if "embed" in name or "head" in name else 0.15)
    return model.eval()


@pytest.fixture
def calibrated_costs_hold(monkeypatch):
    """An engine's step costs stay its priors: for tests that judge requests against known costs. The
    live refit of real step times (tests/test_calibration.py) would move them with the machine's load
    (overhead added to every option shrinks the ratio between two options' costs)."""
    monkeypatch.setattr(CostFit, "solve", lambda self: (1.0, 0.0))


@pytest.fixture
def tiny_model() -> TriModeModel:
    return random_model()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, on loopback, without dashboard or token auth. Its workers run
    at the tests' niceness, as under ``triserve serve``: at Ray's default of 15 the other xdist
    worker's CPU-bound tests took the CPU from the served app's replicas for tens of seconds (streams
    that stalled past the reliability tests' 30 s hang limit, a proxy that missed its health check)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from cluster.local import ensure_ray  # sets the loopback variable before Ray is imported

    ensure_ray(num_cpus=2, worker_niceness=0)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_local) -> int:
    """Serve's HTTP proxy, started once per session on a free loopback port.

    (Serve keeps the proxy of its first start: apps deployed later share this port.)
    """
    import socket

    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def run_app(app, name: str, route_prefix: str, port: int, timeout_s: float = 180.0) -> str:
    """Deploy a Serve app under its own name and prefix; return its base URL once its routes answer.

    (The proxy answers 404 until the routes register, so a 200 from /health is the signal.)
    """
    from ray import serve

    from cluster.local import wait_until_healthy

    serve.run(app, name=name, route_prefix=route_prefix)
    base = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_until_healthy(base, timeout_s)
    return base


# ----- the served test app (tests/test_serve_http.py, test_playground.py, test_lm_eval_client.py) -----
API_KEY = "test-key-123"
# figures under which drafts pay at block 4 on the "calibrated" model
CALIBRATED = {
    "ar": OptionStats(tpf=1.0, step_s=0.010, per_request_s=0.0005),
    "linear_spec@4": OptionStats(tpf=3.0, step_s=0.012, per_request_s=0.004),
    "linear_spec@8": OptionStats(tpf=2.0, step_s=0.014, per_request_s=0.008),
    "quadratic_spec@4": OptionStats(tpf=1.5, step_s=0.030, per_request_s=0.010),
    "diffusion@4": OptionStats(tpf=1.0, step_s=0.012, per_request_s=0.004),
}


@pytest.fixture(scope="session")
def client(app):
    """The official openai client on the default test app."""
    import openai

    return openai.OpenAI(base_url=f"{app}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tokenizer(fixture_model):
    return fixture_model.tokenizer


@pytest.fixture(scope="session")  # one per xdist worker: the HTTP, playground and lm-eval tests share it
def app(serve_port, fixture_path, tmp_path_factory):
    """The default test app (models tiny, busy, calibrated) at / with API_KEY; its base URL."""
    import shutil

    import yaml
    from ray import serve

    from deployments.config import load_config
    from deployments.ingress import build_app

    os.environ["TRISERVE_TEST_API_KEY"] = API_KEY  # read by the ingress replica (same machine, inherited)
    folder = tmp_path_factory.mktemp("app")
    busy = folder / "busy"  # a small random model that admits one request at a time and queues one
    # the fixture's tokenizer: its vocabulary (a random model's default of 64 tokens would be a
    # model its tokenizer does not fit, which the ingress refuses)
    save_model(random_model(seed=12, eos_token_id=None, max_position_embeddings=2048, vocab_size=4096), busy)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(fixture_path / name, busy / name)
    calibrated = folder / "calibrated"  # the fixture with calibration figures under which drafts pay at block 4
    shutil.copytree(fixture_path, calibrated)
    dtype = models.load_model(calibrated).dtype
    save_calibration(calibrated, device_key("cpu", 1, dtype), CALIBRATED)
    config = {
        "models": [
            {
                "name": "tiny",
                "path": str(fixture_path),
                "num_pages": 256,
                "max_running": 16,
                "max_step_tokens": 512,
                "num_cpus": 0.25,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
            },
            {"name": "busy", "path": str(busy), "max_running": 1, "max_waiting": 1, "num_cpus": 0.1},
            {"name": "calibrated", "path": str(calibrated), "size": 1, "num_cpus": 0.1},
        ],
        "router": {"explore": 0.0},  # tests that assert the router's choice must not meet an exploration
        "tiers": {"interactive": {"ttft_ms": 400, "tpot_ms": 40}, "standard": {"ttft_ms": 3000, "tpot_ms": 500}},
        "api_key_env": "TRISERVE_TEST_API_KEY",
        "ingress": {"num_cpus": 0.1},
    }
    (folder / "app.yaml").write_text(yaml.safe_dump(config))
    port = serve_port
    base = run_app(build_app(load_config(folder / "app.yaml")), "triserve", "/", port, timeout_s=120)
    yield base
    serve.delete("triserve")

"""Autoscaling: under sustained load a model deployment with max 2 replicas scales to 2, the
statistics the router reads then cover both replicas, and the sequences of an ``n`` request still
share one replica's prompt pages (prefix affinity)."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from models.loading import save_model
from tests.conftest import random_model

pytestmark = pytest.mark.ray


def test_scales_to_two_replicas_under_load(serve_port, fixture_path, tmp_path):
    from ray import serve

    from deployments.config import parse_config
    from deployments.ingress import build_app

    model = random_model(seed=4, eos_token_id=None, max_position_embeddings=4096, vocab_size=4096)  # the tokenizer's
    save_model(model, tmp_path / "rand")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(fixture_path / name, tmp_path / "rand" / name)  # a cheap random model, a real tokenizer
    config = parse_config(
        {
            "models": [
                {
                    "name": "rand",
                    "path": str(tmp_path / "rand"),
                    "num_cpus": 0.1,
                    "num_pages": 256,
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "target_ongoing_requests": 1,
                        "upscale_delay_s": 1,
                        "downscale_delay_s": 600,
                        "metrics_interval_s": 0.5,
                        "look_back_period_s": 2,
                    },
                }
            ],
            "api_key_env": None,
            "ingress": {"num_cpus": 0.05},
        }
    )
    port = serve_port
    serve.run(build_app(config), name="autoscale", route_prefix="/autoscale")
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                httpx.post(
                    f"http://127.0.0.1:{port}/autoscale/v1/completions",
                    timeout=120,
                    json={"model": "rand", "prompt": [1, 5, 6], "max_tokens": 300, "temperature": 0},
                )
            except httpx.HTTPError:
                time.sleep(0.1)

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        deadline = time.time() + 120
        replicas = 0
        while time.time() < deadline:
            status = serve.status().applications["autoscale"].deployments["model-rand"]
            replicas = status.replica_states.get("RUNNING", 0)
            if replicas == 2:
                break
            time.sleep(1)
        assert replicas == 2
        # any replica answers stats with the aggregate over both (each reports to the shared board)
        handle = serve.get_deployment_handle("model-rand", "autoscale")
        stats = _settled_stats(handle, lambda s: s["replicas"] == 2)
        assert stats["replicas"] == 2 and stats["pages"] == 2 * 256, stats
        stop.set()
        for w in workers:
            w.join(timeout=150)
        _assert_n_shares_one_prompt(handle, port)
    finally:
        stop.set()
        serve.delete("autoscale")


def _settled_stats(handle, until) -> dict:
    """The model's aggregate statistics once ``until`` holds for them (replicas report every 0.5 s)."""
    deadline, stats = time.time() + 30, {}
    while time.time() < deadline:
        stats = handle.stats.remote().result()
        if until(stats):
            return stats
        time.sleep(0.5)
    return stats


def _assert_n_shares_one_prompt(handle, port) -> None:
    """Four sequences of a 40-token prompt (two full pages the prefix cache can share): with both
    replicas idle, power-of-two-choices routing would spread them over the two (each replica computing
    the prompt); the affinity router sends them to one, which computes it once."""
    before = _settled_stats(handle, lambda s: s["running"] == 0 and s["waiting"] == 0)
    assert before["running"] == 0, before
    r = httpx.post(
        f"http://127.0.0.1:{port}/autoscale/v1/completions",
        timeout=120,
        json={"model": "rand", "prompt": list(range(100, 140)), "max_tokens": 4, "n": 4, "temperature": 1},
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text
    shared = 3 * 32  # three of the four sequences take both pages from the cache
    after = _settled_stats(handle, lambda s: s["prefix_cache_hits"] - before["prefix_cache_hits"] >= shared)
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == shared, (before, after)


def test_ray_serve_cli_builder_accepts_the_default_config():
    """`serve run deployments.ingress:app_builder config=FILE` builds the same application."""
    from ray.serve import Application

    from deployments.config import DEFAULT_CONFIG
    from deployments.ingress import app_builder

    assert isinstance(app_builder({"config": str(DEFAULT_CONFIG)}), Application)

"""Tensor parallelism served: cluster/serve-cpu.yaml's application (the bundled model at TP=2 on
gloo) deployed the way `serve run` builds it, answering over real HTTP with TP=1's tokens."""

from __future__ import annotations

import os

import openai
import pytest
import torch
import yaml

import models
from tests.conftest import REPO, run_app

pytestmark = pytest.mark.ray

TINY = REPO / "models" / "bundled" / "tiny-code"
MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]
PROMPT = "def fibonacci(n):\n    if n < 2:"


@pytest.fixture(scope="session")  # session: xdist may interleave this module's tests with others
def tp_app(serve_port):
    """The CPU Serve config's app, built by Ray's own builder call, under its own name and prefix."""
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "cluster" / "serve-cpu.yaml").read_text()))
    entry = schema.applications[0]
    assert entry.args["config"]["models"][0]["tensor_parallel_size"] == 2
    app = call_user_app_builder_with_args_if_necessary(import_attr(entry.import_path), entry.args)
    base = run_app(app, "triserve-tp", "/tp", serve_port, timeout_s=180)
    yield base
    serve.delete("triserve-tp")


@pytest.fixture(scope="session")
def client(tp_app):
    key = os.environ.get("TRISERVE_API_KEY") or "unused"
    return openai.OpenAI(base_url=f"{tp_app}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def reference():
    return models.load_model(TINY, dtype=torch.float32)


def test_tp2_group_answers_with_tp1_tokens_in_every_mode(client, reference):
    tokenizer = reference.tokenizer
    for mode in MODES:
        resp = client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            extra_body={"decoding": {"mode": mode, "block_length": 8}},
        )
        expected = models.generate(reference, tokenizer.encode(PROMPT), mode=mode, max_new_tokens=24, block_length=8)
        assert resp.choices[0].text == tokenizer.decode(expected.tokens, skip_special_tokens=True), mode
        assert resp.usage.completion_tokens == len(expected.tokens), mode
        assert resp.model_extra["triserve"]["nfe"] == expected.nfe, mode


def test_tp2_scoring_matches_tp1(client, reference):
    """Each scoring call allocates a fresh KV cache on every rank (and drops it afterwards)."""
    ids = reference.tokenizer.encode(PROMPT)
    for _ in range(3):
        resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
        assert resp.choices[0].logprobs.token_logprobs[1:] == pytest.approx(models.score(reference, ids), abs=1e-4)


def test_rank_actor_sits_in_the_replicas_placement_group(tp_app, ray_local):
    ranks = [a for a in ray_local.util.list_named_actors(all_namespaces=True) if a["name"].startswith("triserve-tiny-")]
    assert len(ranks) == 1 and ranks[0]["name"].endswith("-rank1")
    groups = [
        g
        for g in ray_local.util.placement_group_table().values()
        if g["state"] == "CREATED" and len(g["bundles"]) == 2 and g["strategy"] == "PACK"
    ]
    assert any(all(b.get("CPU") == 0.25 for b in g["bundles"].values()) for g in groups)

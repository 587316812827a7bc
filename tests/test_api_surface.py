"""The API's self-description and its small routes, over HTTP through FastAPI (no Ray): /openapi.json
is valid OpenAPI and documents every POST body, /tokenize and /detokenize round-trip, and /health
turns 503 when no replica of any model answers."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from ray.serve.exceptions import BackPressureError

from deployments.config import parse_config
from deployments.http import build_api
from deployments.ingress import HandleBackend
from deployments.openai_api import OpenAIService
from deployments.response_models import (
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    TokenizeResponse,
)
from deployments.served import ServedModel
from models.vlm import read_config


class DeadBackend:
    """A model whose replicas do not answer."""

    async def stats(self):
        await asyncio.sleep(60)

    def generate(self, request):
        raise RuntimeError("no replica")

    async def score(self, token_ids, top):
        raise RuntimeError("no replica")


class LiveBackend(DeadBackend):
    async def stats(self):
        return {"running": 0, "waiting": 0}


@pytest.fixture
def make_client(fixture_path, fixture_model):
    def make(*backends) -> TestClient:
        names = [f"m{i}" for i in range(len(backends))]
        config = parse_config({"models": [{"name": n, "path": str(fixture_path)} for n in names]})
        text_config, _ = read_config(fixture_path)
        served = {
            spec.name: ServedModel(spec, text_config, fixture_model.tokenizer, backend)
            for spec, backend in zip(config.models, backends)
        }
        service = OpenAIService(config, served)
        client = TestClient(build_api(lambda: service))
        client.service = service  # for tests that change its state
        return client

    return make


def test_openapi_is_valid_and_documents_every_post_body(make_client):
    spec = make_client(LiveBackend()).get("/openapi.json").json()
    validate(spec)
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert set(posts) == {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    schemas = spec["components"]["schemas"]
    for op in posts.values():
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert schemas[ref.rsplit("/", 1)[1]]["properties"]
    assert {"prompt", "suffix", "decoding"} <= set(schemas["CompletionRequest"]["properties"])
    # every route documents its success body, and the POST routes their OpenAI-shaped errors
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            ok = op["responses"]["200"]["content"]["application/json"]["schema"]
            assert schemas[ok["$ref"].rsplit("/", 1)[1]]["properties"], (method, path)
            if method == "post":
                error = op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
                assert error.endswith("/ErrorResponse")
    for path, chunk in (("/v1/completions", "CompletionResponse"), ("/v1/chat/completions", "ChatCompletionChunk")):
        stream = spec["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        assert stream["$ref"].endswith("/" + chunk) and "choices" in schemas[chunk]["properties"]


def test_tokenize_and_detokenize_round_trip(make_client, fixture_model):
    client = make_client(LiveBackend())
    text = "def add(a, b):\n    return a + b\n"
    got = TokenizeResponse.model_validate(client.post("/tokenize", json={"model": "m0", "prompt": text}).json())
    got = got.model_dump()
    assert got["tokens"] == fixture_model.tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == fixture_model.config.max_position_embeddings
    back = DetokenizeResponse.model_validate(
        client.post("/detokenize", json={"model": "m0", "tokens": got["tokens"]}).json()
    )
    back = back.model_dump()
    assert back["prompt"] == fixture_model.tokenizer.decode(got["tokens"])
    chat = client.post("/tokenize", json={"model": "m0", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 1
    for body, status in (
        ({"model": "m0", "tokens": [-1]}, 400),
        ({"model": "nope", "tokens": [5]}, 404),
        ({"model": "m0"}, 400),
        ({"model": "m0", "messages": []}, 400),  # found by fuzzing: a 500 from the chat template
    ):
        r = client.post("/detokenize" if "tokens" in body else "/tokenize", json=body)
        assert r.status_code == status and ErrorResponse.model_validate(r.json()).error.message


def test_health_is_503_while_no_replica_answers(make_client):
    client = make_client(DeadBackend(), LiveBackend())
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["models"] == {"m0": "unavailable", "m1": "ok"}
    HealthResponse.model_validate(r.json())
    ModelList.model_validate(client.get("/v1/models").json())
    r = make_client(DeadBackend()).get("/health")
    assert r.status_code == 503 and HealthResponse.model_validate(r.json()).status == "unavailable"


def test_a_draining_server_refuses_new_requests(make_client):
    """While shutting down (SIGTERM) the ingress answers new requests with a retryable 503 and /health
    with 503, so that balancers take it out of rotation."""
    client = make_client(LiveBackend())
    assert client.get("/health").status_code == 200
    client.service.draining = True
    r = client.post("/v1/completions", json={"model": "m0", "prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "shutting_down"
    assert client.get("/health").status_code == 503


class HangingBackend(DeadBackend):
    """A model with no live replica: every call waits."""

    async def generate(self, request):
        await asyncio.sleep(3600)
        yield {}


def test_a_model_without_a_live_replica_does_not_hold_a_request(make_client):
    """Found by bench/reliability.py's rank kill: while a model's only replica is being replaced, its
    statistics call waited for the new one (over 30 s). Routing gives up on it after 5 s and the
    request's own deadline ends its wait for a replica with a 408."""
    client = make_client(HangingBackend())
    start = time.monotonic()
    r = client.post("/v1/completions", json={"model": "m0", "prompt": "x", "max_tokens": 2, "timeout": 1.0})
    assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
    assert time.monotonic() - start < 10


class SaturatedHandle:
    """A deployment handle whose every call Serve's backpressure refuses (replicas busy, the caller's
    queue at ``max_queued_requests``)."""

    def __getattr__(self, method: str):
        async def refused(*args):
            raise BackPressureError(num_queued_requests=128, max_queued_requests=128)

        return SimpleNamespace(remote=refused)


def test_a_full_queue_answers_429_even_for_the_statistics_call(make_client):
    """With the replicas saturated the statistics call waits in the same queue as requests, and Serve's
    backpressure may refuse it: that is the model's queue being full (a 429), not a server error (before,
    Serve answered its own plain-text 503)."""
    client = make_client(HandleBackend(SaturatedHandle(), "m0"))
    r = client.post("/v1/completions", json={"model": "m0", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"

"""The Serve app: an ``Ingress`` (FastAPI, OpenAI API, router) in front of one ``ModelServer``
deployment per configured model."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray import exceptions as ray_exceptions
from ray import serve
from ray.serve import exceptions as serve_exceptions
from ray.serve.handle import DeploymentHandle

from deployments.config import REPO, AppConfig, ModelSpec, load_config, parse_config
from deployments.http import build_api
from deployments.metrics import RouterMetrics
from deployments.openai_api import OpenAIService
from deployments.protocol import APIError, overloaded, unavailable
from deployments.served import ServedModel
from deployments.server import ReplicaFailed, model_server_deployment
from models.loading import load_tokenizer
from models.vlm import read_config


def _replica_service() -> OpenAIService:
    return serve.get_replica_context().servable_object.service


api = build_api(_replica_service)


def _api_error(exc: Exception, model: str) -> Exception:
    """What a client is told when a call to a model's replicas fails: a replica that died or is
    unreachable, or a deployment that sheds load, is a retryable 503 / 429 (with Retry-After); a bad
    request the replica refused is a 400; anything else stays an internal error."""
    if isinstance(exc, serve_exceptions.BackPressureError):
        return overloaded(model)
    if isinstance(exc, ray_exceptions.RayTaskError) and isinstance(exc.cause, ValueError):
        return APIError(400, str(exc.cause))
    if isinstance(exc, ray_exceptions.RayTaskError) and isinstance(exc.cause, ReplicaFailed):
        return unavailable(f"a replica of model '{model}' failed ({exc.cause}); retry shortly")
    gone = (
        ray_exceptions.RayActorError,
        serve_exceptions.DeploymentUnavailableError,
        serve_exceptions.ReplicaUnavailableError,
    )
    if isinstance(exc, gone):
        return unavailable(f"a replica of model '{model}' failed or is unreachable; retry shortly")
    return exc


def _cancel(stream) -> None:
    """Cancel a streamed call. A call that failed before reaching a replica (refused by backpressure,
    no replica) has nothing to cancel, and Ray's ``cancel`` raises that failure again: it was already
    answered, so it is not raised twice (it would replace the client's 429 / 503 with Serve's own)."""
    try:
        stream.cancel()
    except (ray_exceptions.RayError, serve_exceptions.RayServeException):
        pass


class HandleBackend:
    """Reaches a model's replicas through its deployment handle."""

    def __init__(self, handle: DeploymentHandle, model: str) -> None:
        self.handle = handle
        self.model = model

    async def generate(self, request: dict[str, Any]):
        stream = self.handle.options(stream=True).generate.remote(request)
        try:
            async for item in stream:
                yield item
        except (ray_exceptions.RayError, serve_exceptions.BackPressureError) as exc:
            raise _api_error(exc, self.model) from exc
        finally:
            _cancel(stream)  # client gone or stop string: the replica cancels the request

    async def score(self, token_ids: list[int], top: int):
        try:
            return await self.handle.score.remote(token_ids, top)
        except (ray_exceptions.RayError, serve_exceptions.BackPressureError) as exc:
            raise _api_error(exc, self.model) from exc

    async def stats(self) -> dict[str, Any]:
        try:
            return await self.handle.stats.remote()
        except (ray_exceptions.RayError, serve_exceptions.BackPressureError) as exc:
            raise _api_error(exc, self.model) from exc


@serve.ingress(api)
class Ingress:
    def __init__(self, raw_config: dict[str, Any], handles: dict[str, DeploymentHandle]) -> None:
        config = parse_config(raw_config)
        router_metrics = RouterMetrics()
        models = {}
        for spec in config.models:
            tokenizer = load_tokenizer(spec.path)
            text_config, vision = read_config(spec.path)
            if len(tokenizer) > text_config.vocab_size:  # its ids would index past the embedding (a 500 per request)
                vocab = text_config.vocab_size
                raise ValueError(f"model '{spec.name}': its tokenizer has {len(tokenizer)} tokens, the model {vocab}")
            if vision is not None:
                vision.image_tokens(tokenizer)  # a VLM without placeholder ids fails here, at deploy time
            models[spec.name] = ServedModel(
                spec, text_config, tokenizer, HandleBackend(handles[spec.name], spec.name), vision
            )

        def record(tier, decision):
            router_metrics.decisions.inc(tags={"tier": tier, "model": decision.model, "mode": decision.mode})

        self.service = OpenAIService(config, models, on_decision=record)

    def drain(self) -> int:
        """Refuse new requests from now on (503, Retry-After) and say how many are still in flight:
        a graceful shutdown waits for them (``triserve serve`` on SIGTERM)."""
        self.service.draining = True
        return sum(self.service.in_flight.values())


def build_app(config: AppConfig):
    """The Serve application for a parsed config."""
    handles = {spec.name: model_server_deployment(spec).bind(asdict(spec)) for spec in config.models}
    raw = {
        "models": [asdict(spec) for spec in config.models],
        "tiers": {
            name: {
                "ttft_ms": t.ttft * 1000 if t.ttft != float("inf") else None,
                "tpot_ms": t.tpot * 1000 if t.tpot != float("inf") else None,
            }
            for name, t in config.tiers.items()
        },
        "api_key_env": config.api_key_env,
        "images": asdict(config.images),
        "router": {"explore": config.explore},
        "ingress": {"max_body_mb": config.max_body_bytes / 2**20, "request_timeout_s": config.request_timeout_s},
    }
    options: dict[str, Any] = {"num_cpus": config.ingress_num_cpus}
    key_env = config.api_key_env
    if key_env and os.environ.get(key_env):  # the deployer's key reaches the ingress replicas
        options["runtime_env"] = {"env_vars": {key_env: os.environ[key_env]}}
    ingress = serve.deployment(
        Ingress,
        name="ingress",
        num_replicas=config.ingress_replicas,
        ray_actor_options=options,
        max_ongoing_requests=1024,
    )
    return ingress.bind(raw, handles)


def app_builder(args: dict[str, Any]):
    """For Ray's own CLI and Serve config files: ``config`` is an app YAML's path or the app config itself.

    ``serve run deployments.ingress:app_builder config=path/to/app.yaml``, or in a Serve config
    (``serve run``/``serve deploy``, KubeRay's ``serveConfigV2``) ``args: {config: {models: ...}}``,
    whose relative model paths are taken from the repository root (the code's working_dir on a cluster).
    """
    config = args.get("config")
    if isinstance(config, dict):
        return build_app(parse_config(config, base=REPO))
    return build_app(load_config(Path(config) if config else None))


__all__ = ["Ingress", "ModelSpec", "app_builder", "build_app"]

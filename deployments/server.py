"""``ModelServer``: one engine per replica, stepping in a process of its own (a thread for tensor
parallelism, or with ``engine_process: false``), results streamed back through the replica's loop.

Each replica loads the router's priors for its device (``triserve calibrate``), reports its
statistics to the deployment's shared ``StatsBoard`` every ``REPORT_PERIOD_S`` and answers ``stats``
with the aggregate over all replicas (deployments/stats_board.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.config import DeploymentActorConfig, RequestRouterConfig
from ray.serve.exceptions import RayServeException

from deployments import metrics
from deployments.affinity_router import PrefixAffinityRouter
from deployments.config import ModelSpec
from deployments.stats_board import StatsBoard, merge_stats, replica_stats
from models.engine import AsyncEngine
from models.engine.async_engine import StreamFront
from models.engine.engine_process import ProcessEngine
from models.engine.host import EngineSettings, build_engine, load_host, prompt_embeds, score_top
from models.modes import DecodeParams

STUCK_AFTER_S = 120.0
GAUGE_PERIOD_S = 0.5
REPORT_PERIOD_S = 0.5
BOARD = "stats-board"
logger = logging.getLogger("ray.serve")


class ReplicaFailed(RuntimeError):
    """This replica can no longer serve (its tensor-parallel group broke); the request may be retried."""


class ModelServer:
    """A model replica. Its methods are called through deployment handles by the ingress."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = ModelSpec(**spec)
        settings = EngineSettings(
            self.spec.path,
            dtype=self.spec.dtype,
            device=self.spec.device,
            threads=self.spec.cpu_threads,
            int8_drafts=self.spec.int8_drafts,
            engine={
                "num_pages": self.spec.num_pages,
                "page_size": self.spec.page_size,
                "max_running": self.spec.max_running,
                "max_step_tokens": self.spec.max_step_tokens,
                "prefill_chunk": self.spec.prefill_chunk,
                "prefix_caching": self.spec.prefix_caching,
                "priority_ageing_s": self.spec.priority_ageing_s,
                "speculation_max_batch": self.spec.speculation_max_batch,
                "cuda_graphs": self.spec.cuda_graphs,
            },
        )
        self.group = None  # tensor parallel: the other ranks (this replica is rank 0)
        intervals = (self.spec.stream_interval_s, self.spec.lone_stream_interval_s)
        if self.spec.tensor_parallel_size > 1:  # rank 0 steps on a thread here, beside its group's handles
            torch.set_num_threads(self.spec.cpu_threads)
            self.group = self._start_group()
            engine, info = build_engine(self.group.model, settings, warm=False)  # ranks prepare on their first step
            self.engine: StreamFront = AsyncEngine(engine, *intervals, vlm=self.group.vlm)
            info["vlm"] = self.group.vlm is not None
        elif self.spec.engine_process:
            self.engine = ProcessEngine(settings, *intervals)
            info = self.engine.info
        else:
            host = load_host(settings)
            self.engine = AsyncEngine(host.engine, *intervals, vlm=host.vlm)
            info = host.info
        self.accepts_images = info["vlm"]
        if "warm_up_s" in info:
            logger.info("%s: warmed up in %.2f s (%s)", self.spec.name, info["warm_up_s"], info["dtype"])
        if "cuda_graphs_s" in info:
            logger.info(
                "%s: captured %d CUDA graphs (AR steps; a lone request's other steps at blocks %s) in %.2f s",
                self.spec.name,
                info["cuda_graphs"],
                info["cuda_graph_blocks"],
                info["cuda_graphs_s"],
            )
        priors = "router priors" if info["calibrated"] else "not calibrated"
        logger.info("%s: %s for %s", self.spec.name, priors, info["device"])
        if self.spec.int8_drafts and not info["int8_drafts"]:
            logger.info("%s: int8_drafts is on, but drafts keep the model's products here (no AVX512-VNNI, "
                        "or a model the native CPU forward does not serve)", self.spec.name)  # fmt: skip
        self.metrics = metrics.ModelMetrics(self.spec.name)
        self._gauges_at = 0.0
        self._board = None
        try:
            self.replica: str | None = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # built outside Serve (a test driving it directly): no board
            self.replica = None
        else:
            threading.Thread(target=self._report_loop, name="stats-report", daemon=True).start()

    def _start_group(self):
        """Rank actors on this replica's placement-group bundles 1..TP-1; they die with the replica."""
        from cluster.worker_group import WorkerGroup

        replica = serve.get_replica_context().replica_id.unique_id
        return WorkerGroup(
            self.spec.path,
            self.spec.tensor_parallel_size,
            bundle=self.spec.bundle,
            dtype=self.spec.dtype,
            device=self.spec.device,
            socket_ifname=self.spec.socket_ifname,
            name=f"triserve-{self.spec.name}-{replica}",
        )

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream ``StepOutput``s (as dicts) of one request; closing the stream cancels it. Outputs of
        steps the stream did not collect in time arrive merged.

        A request with ``images`` (preprocessed pixel arrays, in prompt order) has them encoded once,
        on the engine thread, into the embeddings its prefill places on the image placeholders."""
        params = DecodeParams(**request["params"])
        embeds = None
        if request.get("images"):
            if not self.accepts_images:
                raise ValueError(f"model '{self.spec.name}' does not accept images")
            embeds = await self.engine.call(prompt_embeds, request["prompt"], request["images"])
        start = time.monotonic()
        last = start
        tier = request.get("tier", "standard")
        outputs = self.engine.generate(request["request_id"], request["prompt"], params, embeds, tier)
        async for out in self._unless_broken(outputs):
            now = time.monotonic()
            if out.new_tokens:
                if out.tokens == len(out.new_tokens):
                    self.metrics.ttft.observe(now - start, tags={"mode": params.mode})
                else:
                    self.metrics.itl.observe((now - last) / len(out.new_tokens), tags={"mode": params.mode})
                last = now
            for length in out.new_accepted:
                self.metrics.accepted.observe(length, tags={"mode": params.mode})
            if out.finished:
                self.metrics.finished(params.mode, tier, out, now - start)
            if now - self._gauges_at > GAUGE_PERIOD_S:  # engine gauges: not on every output of every request
                self._gauges_at = now
                self.metrics.engine(self.engine.stats)
            yield dataclasses.asdict(out)

    async def _unless_broken(self, outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The engine's outputs; when the engine fails because the tensor-parallel group broke (a rank
        died), a ``ReplicaFailed`` instead of the collective's own error: the client's request was
        fine and another replica can serve it (the health check has Serve replace this one)."""
        try:
            async for out in outputs:
                yield out
        except Exception as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from exc

    def _failure(self, exc: Exception) -> Exception:
        """``exc``, or a ``ReplicaFailed`` when the tensor-parallel group is broken."""
        if self.group is None or isinstance(exc, ValueError):
            return exc
        try:
            self.group.check(timeout_s=1.0)
        except Exception:
            return ReplicaFailed(f"{self.spec.name}: a tensor-parallel rank died ({exc})")
        return exc

    async def score(self, token_ids: list[int], top: int) -> list[tuple[float, dict[int, float]]]:
        try:
            return await self.engine.call(score_top, token_ids, top)
        except Exception as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from exc

    def local_stats(self) -> dict[str, Any]:
        return replica_stats(self.engine.stats, self.spec.max_step_tokens)

    def _board_handle(self):
        if self._board is None:
            self._board = serve.get_deployment_actor(BOARD)
        return self._board

    def _report_loop(self) -> None:
        while True:
            time.sleep(REPORT_PERIOD_S)
            try:
                self._board_handle().report.remote(self.replica, self.local_stats())
            except Exception:  # the board is not (yet, or no longer) registered: look it up next time
                self._board = None

    async def stats(self) -> dict[str, Any]:
        """The model's statistics over all its live replicas; this replica's own when the board is
        unreachable (being recreated)."""
        local = self.local_stats()
        if self.replica is None:
            return merge_stats([local])
        try:
            ref = self._board_handle().aggregate.remote(self.replica, local)
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout=2.0)
        except Exception as exc:
            logger.warning("%s: stats board unreachable (%s); answering with this replica's stats", self.spec.name, exc)
            self._board = None
            return merge_stats([local])

    def check_health(self) -> None:
        failure = self.engine.failure()
        if failure:
            raise RuntimeError(failure)
        stuck = self.engine.stuck_for()
        if stuck > STUCK_AFTER_S:
            raise RuntimeError(f"engine loop made no progress for {stuck:.0f}s")
        if self.group is not None:
            self.group.check()  # a dead rank fails the replica; Serve rebuilds it with a new group


def model_server_deployment(spec: ModelSpec):
    """The Serve deployment of one configured model (fractional CPUs, autoscaling)."""
    actor_options: dict[str, Any] = {"num_cpus": spec.num_cpus}
    if spec.num_gpus:
        actor_options["num_gpus"] = spec.num_gpus
    if spec.resources:
        actor_options["resources"] = dict(spec.resources)
    placement: dict[str, Any] = {}
    if spec.tensor_parallel_size > 1:  # bundle 0 holds the replica (rank 0), one more bundle per rank
        placement = {
            "placement_group_bundles": [spec.bundle] * spec.tensor_parallel_size,
            "placement_group_strategy": spec.placement_strategy,
        }
    board = DeploymentActorConfig(name=BOARD, actor_class=ray.remote(StatsBoard), actor_options={"num_cpus": 0})
    return serve.deployment(
        ModelServer,
        name=f"model-{spec.name}",
        deployment_actors=[board],
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"imbalance": spec.affinity_imbalance},
        ),
        ray_actor_options=actor_options,
        **placement,
        autoscaling_config=dict(spec.autoscaling),
        max_ongoing_requests=max(spec.max_running + spec.max_waiting, 16),
        max_queued_requests=spec.max_waiting,  # beyond this many queued at a caller: BackPressureError (429)
        health_check_period_s=10,
        health_check_timeout_s=30,
    )

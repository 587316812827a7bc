"""Tensor-parallel worker groups on Ray: rank 0 in the calling process, ranks 1..TP-1 as actors.

Inside a Serve replica the deployment carries ``placement_group_bundles`` (bundle 0 for the
replica itself, one per extra rank), so each rank actor is pinned to its own bundle of the
replica's placement group; with PACK the group may span nodes. Because the replica owns its rank
actors, they die with it: when Serve replaces an unhealthy replica, the new one builds a new group.

The ranks meet through ``torch.distributed`` (NCCL on GPUs, gloo on CPU) at rank 0's node address
and a free port; the sharding and the per-step protocol live in ``models.tensor_parallel``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.local import ensure_ray
from models.tensor_parallel import (
    TensorParallelModel,
    check_shardable,
    control_group,
    decoder,
    follow,
    init_rank,
    load_shard,
)
from models.vlm import read_config

SOCKET_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
START_TIMEOUT_S = 120.0  # rank actors must be placed (resources found) within this time


def socket_env(ifname: str | None) -> dict[str, str]:
    """The network-interface variables every rank gets: the configured one, else this process's."""
    if ifname:
        return dict.fromkeys(SOCKET_VARIABLES, ifname)
    return {name: os.environ[name] for name in SOCKET_VARIABLES if name in os.environ}


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def actor_resources(bundle: dict[str, float]) -> dict[str, Any]:
    """Ray actor options asking for exactly one placement-group bundle."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0), "resources": custom}


@ray.remote(max_concurrency=2)  # two threads: ``ping`` answers while ``follow`` runs
class RankActor:
    """One rank > 0: joins the process group, loads its own shard, then follows rank 0."""

    def __init__(self, rank: int, env: dict[str, str], threads: int) -> None:
        os.environ.update(env)  # before the process group exists: gloo/NCCL read them at init
        torch.set_num_threads(threads)  # the bundle's CPUs: more threads would fight the other processes
        self.rank = rank

    def setup(self, world: int, address: str, port: int, path: str, dtype: str | None, device: str) -> None:
        init_rank(self.rank, world, address, port, backend=backend_for(device))
        self.control = control_group()
        self.shard = decoder(load_shard(path, dtype=dtype, device=device))

    def follow(self) -> None:
        follow(self.shard, self.control)
        dist.destroy_process_group()

    def ping(self) -> int:
        return self.rank


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


class WorkerGroup:
    """A tensor-parallel model whose rank 0 runs here; ``model`` is what the engine drives.

    ``bundle`` is one rank's resources (a placement-group bundle, e.g. ``{"CPU": 1, "GPU": 1}``).
    Inside a placement group rank ``i`` goes to bundle ``i``; outside one (the CLI's local group)
    the actors are scheduled anywhere the resources fit.
    """

    def __init__(
        self,
        path: str,
        world: int,
        *,
        bundle: dict[str, float],
        dtype: str | None = None,
        device: str = "cpu",
        socket_ifname: str | None = None,
        name: str | None = None,
        tokenizer: bool = False,
    ) -> None:
        check_shardable(read_config(path)[0], world)  # a clear error before any actor starts
        env = socket_env(socket_ifname)
        os.environ.update(env)
        address = ray.util.get_node_ip_address()
        port = free_port(address)
        group = ray.util.get_current_placement_group()
        self.actors = []
        for rank in range(1, world):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank) if group else None
            options = {**actor_resources(bundle), "scheduling_strategy": strategy}
            if name:
                options["name"] = f"{name}-rank{rank}"
            threads = max(1, int(bundle.get("CPU", 1)))
            self.actors.append(RankActor.options(**options).remote(rank, env, threads))
        try:
            ray.get([actor.ping.remote() for actor in self.actors], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as exc:
            raise RuntimeError(
                f"tensor-parallel ranks found no resources {bundle} within {START_TIMEOUT_S:.0f}s"
            ) from exc
        setups = [actor.setup.remote(world, address, port, path, dtype, device) for actor in self.actors]
        init_rank(0, world, address, port, backend=backend_for(device))
        control = control_group()
        shard = load_shard(path, dtype=dtype, device=device, tokenizer=tokenizer)
        ray.get(setups)
        self.following = [actor.follow.remote() for actor in self.actors]
        self.model = TensorParallelModel(decoder(shard), control)
        self.vlm = shard if shard is not self.model.shard else None  # a VLM's encoder runs on rank 0 only

    def check(self, timeout_s: float = 30.0) -> None:
        """Raise unless every rank is alive and still following rank 0 (the replica's health check)."""
        stopped, _ = ray.wait(self.following, num_returns=len(self.following), timeout=0)
        if stopped:
            ray.get(stopped)  # raises the rank's own error (or its death)
            raise RuntimeError("a tensor-parallel rank stopped following rank 0")
        ray.get([actor.ping.remote() for actor in self.actors], timeout=timeout_s)

    def shutdown(self) -> None:
        """Stop the ranks and leave the process group (a replica's group also dies with it)."""
        self.model.close()
        ray.get(self.following, timeout=60)
        dist.destroy_process_group()
        for actor in self.actors:
            ray.kill(actor)


@contextmanager
def local_group(path: str, world: int, *, dtype: str | None = None, num_cpus: float = 0.25) -> Iterator[Any]:
    """One request's group (``triserve generate --tensor-parallel-size N``): the model of rank 0.

    Starts a local Ray on loopback (or joins ``RAY_ADDRESS``) with this process as rank 0 and
    gloo over ``lo`` unless the environment names an interface; Ray is stopped again if started here.
    """
    check_shardable(read_config(path)[0], world)  # before starting anything
    started = not ray.is_initialized()
    ensure_ray()
    local = ray.util.get_node_ip_address() == "127.0.0.1"
    ifname = os.environ.get("GLOO_SOCKET_IFNAME") or ("lo" if local else None)
    group = WorkerGroup(path, world, bundle={"CPU": num_cpus}, dtype=dtype, socket_ifname=ifname, tokenizer=True)
    try:
        yield group.model
    finally:
        group.shutdown()
        if started:
            ray.shutdown()

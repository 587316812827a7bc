"""A TP=2 Serve deployment on a two-node ``ray.cluster_utils.Cluster`` (driven by test_tensor_parallel_cluster.py).

Each node has one CPU and one ``gpu_slot`` (a custom resource standing in for a GPU), and every
rank's bundle asks for a slot, so the group must span both nodes. The script checks the answer,
kills the rank actor while 8 clients send requests (each must complete or get a clean retryable error,
none may hang), waits for Serve to replace the replica (and its group), and checks again.
Everything binds to 127.0.0.1; the cluster is shut down at the end. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import models  # noqa: E402
from bench.reliability import under_kill  # noqa: E402
from cluster.local import start_with_retries  # noqa: E402
from deployments.config import parse_config  # noqa: E402
from deployments.ingress import build_app  # noqa: E402

TINY = REPO / "models" / "bundled" / "tiny-code"
PROMPT = [1, 271, 351, 380, 66, 410]
KILL_LOAD_S = 30.0  # 8 clients' mixed requests; the rank is killed 10 s in
NODE = {"num_cpus": 1, "resources": {"gpu_slot": 1}, "node_ip_address": "127.0.0.1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(base: str, deadline: float) -> list[str]:
    """A greedy completion's text, retried until ``deadline`` (404/503 while routes/replicas come up)."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "decoding": {"mode": "linear_spec"}}
    last = None
    while time.time() < deadline:
        try:
            resp = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            if resp.status_code == 200:
                return resp.json()["choices"][0]["text"]
            last = resp.status_code
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"no completion before the deadline (last: {last})")


def group_nodes() -> dict[str, list[str]]:
    """Created two-bundle placement groups -> the nodes of their bundles."""
    return {
        pg_id: [info["bundles_to_node_id"][i] for i in sorted(info["bundles_to_node_id"])]
        for pg_id, info in ray.util.placement_group_table().items()
        if info["state"] == "CREATED" and len(info["bundles"]) == 2
    }


def rank_actors() -> list[tuple[str, str]]:
    """(namespace, name) of the live rank actors (named after their replica)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return [(a["namespace"], a["name"]) for a in named if a["name"].startswith("triserve-tiny-")]


def start_cluster() -> Cluster:
    """The two-node cluster, started again when a loaded machine keeps a raylet past Ray's 30 s."""

    def start() -> Cluster:
        cluster = Cluster()
        try:
            cluster.add_node(**NODE, include_dashboard=False)  # the first node is the head
            cluster.add_node(**NODE)
        except Exception:
            cluster.shutdown()  # the nodes that did start
            raise
        return cluster

    return start_with_retries(start, undo=lambda: None)


def main() -> None:
    cluster = start_cluster()
    result: dict[str, object] = {}
    try:
        ray.init(address=cluster.address)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = parse_config(
            {
                "models": [
                    {
                        "name": "tiny",
                        "path": str(TINY),
                        "tensor_parallel_size": 2,
                        "dtype": "float32",
                        "num_cpus": 0.25,
                        "resources": {"gpu_slot": 1},
                        "socket_ifname": "lo",
                        "num_pages": 64,
                    }
                ],
                "api_key_env": None,
                "ingress": {"num_cpus": 0.1},
            }
        )
        serve.run(build_app(config), name="tp", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        result["first"] = complete(base, time.time() + 180)
        reference = models.load_model(TINY, dtype=torch.float32)
        expected = models.generate(reference, PROMPT, mode="linear_spec", max_new_tokens=16)
        result["expected"] = reference.tokenizer.decode(expected.tokens, skip_special_tokens=True)
        before = group_nodes()
        result["groups_before"] = before
        result["ranks_before"] = rank_actors()
        namespace, name = result["ranks_before"][0]
        rank = ray.get_actor(name, namespace=namespace)
        load, recovered = asyncio.run(under_kill(base, {}, KILL_LOAD_S, lambda: ray.kill(rank), clients=8))
        result["killed"] = name
        result["under_load"] = {"ok": load.ok, "retryable": load.retryable, "other": load.other, "hangs": load.hangs}
        result["recovered_s"] = recovered
        deadline = time.time() + 240
        while time.time() < deadline:  # Serve notices the unhealthy replica and builds a new one
            ranks = rank_actors()
            if ranks and ranks != result["ranks_before"] and set(group_nodes()) - set(before):
                break
            time.sleep(1)
        result["ranks_after"] = rank_actors()
        result["groups_after"] = group_nodes()
        result["second"] = complete(base, time.time() + 120)
    finally:
        print(json.dumps(result), flush=True)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()

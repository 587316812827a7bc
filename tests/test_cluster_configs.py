"""The shipped cluster files: Serve configs against Ray's own schema and ours, the deployments they
produce, the ``ray up`` config against the autoscaler's schema, the KubeRay manifest's required fields."""

from __future__ import annotations

import copy

import pytest
import yaml

from deployments.config import parse_config
from deployments.ingress import app_builder
from deployments.server import model_server_deployment
from models.config import ModelConfig
from models.tensor_parallel import check_shardable
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
GPU_TP = {"nld-3b": 1, "nld-8b": 2, "nld-14b": 4, "nld-vlm-8b": 2}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", ["serve-cpu.yaml", "serve-gpu.yaml"])
def test_serve_configs_validate(name):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(load(name))
    [entry] = schema.applications
    assert entry.import_path == "deployments.ingress:app_builder" and entry.route_prefix == "/"
    assert isinstance(app_builder(entry.args), Application)  # what `serve run`/`serve deploy` call
    config = parse_config(entry.args["config"], base=REPO)  # unknown fields would raise
    for spec in config.models:
        options = model_server_deployment(spec)
        bundles = options._replica_config.placement_group_bundles
        if spec.tensor_parallel_size == 1:
            assert bundles is None
        else:
            assert bundles == [spec.bundle] * spec.tensor_parallel_size
            assert options._replica_config.placement_group_strategy == spec.placement_strategy
            assert options.ray_actor_options["num_cpus"] <= bundles[0]["CPU"]  # the replica fits bundle 0


def test_gpu_serve_config_models():
    config = parse_config(load("serve-gpu.yaml")["applications"][0]["args"]["config"])
    assert {m.name: m.tensor_parallel_size for m in config.models} == GPU_TP
    for spec in config.models:
        assert spec.bundle["GPU"] == 1 and spec.device == "cuda"
    assert config.model("nld-14b").placement_strategy == "STRICT_PACK"


def test_cpu_serve_config_runs_the_bundled_model_at_tp2():
    [spec] = parse_config(load("serve-cpu.yaml")["applications"][0]["args"]["config"], base=REPO).models
    assert spec.tensor_parallel_size == 2 and spec.device == "cpu" and "GPU" not in spec.bundle
    check_shardable(ModelConfig.from_file(spec.path), spec.tensor_parallel_size)


def test_ray_up_config_validates():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("ray-cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(raw)))
    gpus = {name: t["resources"].get("GPU", 0) for name, t in raw["available_node_types"].items()}
    assert max(gpus.values()) >= max(GPU_TP.values())  # a STRICT_PACK TP=4 group fits one node


def test_rayservice_manifest():
    from ray.serve.schema import ServeDeploySchema

    manifest = load("rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    embedded = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == load("serve-gpu.yaml")  # one Serve config, two ways to deploy it
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"]
    groups = cluster["workerGroupSpecs"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    assert "rayStartParams" in cluster["headGroupSpec"] and all("rayStartParams" in g for g in groups)
    for pod in pods:
        shm = [v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        for container in pod["containers"]:
            assert container["name"] and container["image"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/dev/shm") in shm, container["name"]
            env = {e["name"] for e in container["env"]}
            assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env
    shapes = set()
    for group in groups:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        [container] = group["template"]["spec"]["containers"]
        shapes.add(int(container["resources"]["limits"]["nvidia.com/gpu"]))
    assert len(shapes) == len(groups)  # one group per GPU shape
    config = parse_config(embedded["applications"][0]["args"]["config"])
    strict = [m.tensor_parallel_size for m in config.models if m.placement_strategy == "STRICT_PACK"]
    assert max(shapes) >= max(strict + [1])


def test_model_spec_rejects_bad_tensor_parallel_settings():
    with pytest.raises(ValueError, match="placement_strategy must be one of PACK, STRICT_PACK, got 'SPREAD'"):
        parse_config({"models": [{"name": "m", "path": "x", "placement_strategy": "SPREAD"}]})
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        parse_config({"models": [{"name": "m", "path": "x", "tensor_parallel_size": 0}]})
    with pytest.raises(ValueError, match="unknown model fields: tp"):
        parse_config({"models": [{"name": "m", "path": "x", "tp": 2}]})
    with pytest.raises(ValueError, match="prefix_caching must be true or false, got 'false'"):
        parse_config({"models": [{"name": "m", "path": "x", "prefix_caching": "false"}]})
    with pytest.raises(ValueError, match="int8_drafts must be true or false, got 'yes'"):
        parse_config({"models": [{"name": "m", "path": "x", "int8_drafts": "yes"}]})
    with pytest.raises(ValueError, match="cuda_graphs needs tensor_parallel_size 1"):
        parse_config({"models": [{"name": "m", "path": "x", "tensor_parallel_size": 2, "cuda_graphs": True}]})
    # unset: on for a one-rank replica, off for a tensor-parallel group
    one, group = parse_config(
        {"models": [{"name": "a", "path": "x"}, {"name": "b", "path": "x", "tensor_parallel_size": 2}]}
    ).models
    assert one.cuda_graphs is True and group.cuda_graphs is False


def test_model_spec_rejects_bad_stream_intervals():
    for name, value in (("stream_interval_s", -1), ("lone_stream_interval_s", "5ms")):
        with pytest.raises(ValueError, match=f"{name} must be seconds from 0 to 10, got"):
            parse_config({"models": [{"name": "m", "path": "x", name: value}]})


def test_router_settings_are_validated():
    model = {"name": "m", "path": "x"}
    assert parse_config({"models": [model], "router": {"load_window_s": 2}}).load_window_s == 2.0
    with pytest.raises(ValueError, match="router.load_window_s must not be negative"):
        parse_config({"models": [model], "router": {"load_window_s": -1}})
    with pytest.raises(ValueError, match="unknown router fields: window"):
        parse_config({"models": [model], "router": {"window": 1}})

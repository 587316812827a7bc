"""The app configuration (YAML): models, tiers, autoscaling, API key."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deployments.router import TierTarget
from models.engine.engine import check_speculation_max_batch
from vision.loading import ImageLimits

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "deployments" / "configs" / "default.yaml"
PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK")


@dataclass
class ModelSpec:
    name: str
    path: str
    size: float | None = None  # parameters; read from the checkpoint when absent
    tensor_parallel_size: int = 1
    dtype: str | None = None
    num_pages: int = 1024
    page_size: int = 16
    max_running: int = 32
    max_waiting: int = 128  # queued requests per replica, and as many per ingress replica; beyond: 429
    max_step_tokens: int = 2048  # query tokens per engine step (decode steps are whole; prefills are chunked)
    prefill_chunk: int = 256  # prompt tokens of one request per step at most
    prefix_caching: bool = True
    affinity_imbalance: int = 8  # prompts that start alike share a replica unless it queues this many more
    stream_interval_s: float = 0.1  # while requests share the engine, a stream sends at most this often
    lone_stream_interval_s: float = 0.005  # a lone request's stream sends at most this often
    engine_process: bool = True  # step the engine in a process of its own (tensor parallel: always a thread)
    priority_ageing_s: float = 5.0  # a request waiting this long counts one tier more urgent
    # above this many requests speculative ones take AR steps ("auto": where the calibration says
    # speculation stops paying; null: never; models/engine/engine.py)
    speculation_max_batch: int | str | None = "auto"
    # GPU replicas: steps of one shape (AR tokens, drafts, verifies, quadratic cycles, denoise passes)
    # replay CUDA graphs (models/engine/step_graphs.py), those of AR decodes captured at load; null
    # (default): on where the replica is one rank (a CPU replica ignores it)
    cuda_graphs: bool | None = None
    # CPU replicas: speculative drafts multiply in int8 where the CPU has VNNI (TriModeModel.int8_drafts)
    int8_drafts: bool = False
    num_cpus: float = 0.5
    threads: int | None = None  # torch CPU threads per replica / rank (default: its whole CPUs, at least 1)
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per replica / rank
    placement_strategy: str = "PACK"  # tensor parallel: PACK may span nodes, STRICT_PACK keeps one node
    socket_ifname: str | None = None  # GLOO_/NCCL_SOCKET_IFNAME for the ranks (default: inherited)
    autoscaling: dict[str, Any] = field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.affinity_imbalance, int) or self.affinity_imbalance < 0:
            raise ValueError(f"model {self.name}: affinity_imbalance must be a non-negative integer")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"model {self.name}: tensor_parallel_size must be a positive integer")
        try:
            check_speculation_max_batch(self.speculation_max_batch)
        except ValueError as exc:
            raise ValueError(f"model {self.name}: {exc}") from None
        for name in ("stream_interval_s", "lone_stream_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
                raise ValueError(f"model {self.name}: {name} must be seconds from 0 to 10, got {value!r}")
        if self.cuda_graphs is None:
            self.cuda_graphs = self.tensor_parallel_size == 1
        for flag in ("prefix_caching", "engine_process", "cuda_graphs", "int8_drafts"):
            if not isinstance(getattr(self, flag), bool):  # a quoted "false" would read as on
                raise ValueError(f"model {self.name}: {flag} must be true or false, got {getattr(self, flag)!r}")
        if self.cuda_graphs and self.tensor_parallel_size > 1:
            raise ValueError(f"model {self.name}: cuda_graphs needs tensor_parallel_size 1")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"model {self.name}: placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                f"got {self.placement_strategy!r}"
            )

    @property
    def bundle(self) -> dict[str, float]:
        """One rank's resources: the replica itself (rank 0) and each placement-group bundle."""
        gpus = {"GPU": self.num_gpus} if self.num_gpus else {}
        return {"CPU": self.num_cpus, **gpus, **self.resources}

    @property
    def cpu_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


@dataclass
class AppConfig:
    models: list[ModelSpec]
    tiers: dict[str, TierTarget]
    api_key_env: str | None = "TRISERVE_API_KEY"
    ingress_num_cpus: float = 0.25
    ingress_replicas: int = 1
    images: ImageLimits = field(default_factory=ImageLimits)  # limits on image inputs (VLMs)
    explore: float = 0.05  # share of mode "auto" requests the router sends to another option to measure it
    load_window_s: float = 5.0  # the router plans for the most requests in flight during this window
    max_body_bytes: int = 64 * 2**20  # larger request bodies get a 413 before they are read to the end
    request_timeout_s: float = 600.0  # a request still running after this is cancelled (its ``timeout`` may be shorter)
    shutdown_grace_s: float = 30.0  # on SIGTERM / SIGINT, requests in flight get this long to finish

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)


def _tier(raw: dict[str, Any] | None) -> TierTarget:
    raw = raw or {}
    ttft = raw.get("ttft_ms")
    tpot = raw.get("tpot_ms")
    return TierTarget(
        ttft=math.inf if ttft is None else ttft / 1000.0,
        tpot=math.inf if tpot is None else tpot / 1000.0,
    )


INGRESS_FIELDS = {"num_cpus", "num_replicas", "max_body_mb", "request_timeout_s", "shutdown_grace_s"}
ROUTER_FIELDS = {"explore", "load_window_s"}


def parse_config(raw: dict[str, Any], base: Path | None = None) -> AppConfig:
    """Build an AppConfig from a mapping; model paths are relative to ``base`` (the YAML's folder)."""
    if not raw.get("models"):
        raise ValueError("config needs at least one entry under 'models'")
    models = []
    for entry in raw["models"]:
        entry = dict(entry)
        unknown = set(entry) - set(ModelSpec.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model fields: {', '.join(sorted(unknown))}")
        path = Path(entry["path"])
        if not path.is_absolute() and base is not None:
            path = (base / path).resolve()
        entry["path"] = str(path)
        models.append(ModelSpec(**entry))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError("model names must be unique")
    tiers = {name: _tier(values) for name, values in (raw.get("tiers") or {}).items()}
    for name in ("interactive", "standard", "batch"):
        tiers.setdefault(name, TierTarget())
    ingress = dict(raw.get("ingress") or {})
    if set(ingress) - INGRESS_FIELDS:
        raise ValueError(f"unknown ingress fields: {', '.join(sorted(set(ingress) - INGRESS_FIELDS))}")
    max_body_mb = float(ingress.get("max_body_mb", 64))
    timeout = float(ingress.get("request_timeout_s", 600.0))
    grace = float(ingress.get("shutdown_grace_s", 30.0))
    if max_body_mb <= 0 or timeout <= 0 or grace < 0:
        raise ValueError("ingress.max_body_mb and request_timeout_s must be positive, shutdown_grace_s not negative")
    router = dict(raw.get("router") or {})
    if set(router) - ROUTER_FIELDS:
        raise ValueError(f"unknown router fields: {', '.join(sorted(set(router) - ROUTER_FIELDS))}")
    explore = float(router.get("explore", 0.05))
    if not 0.0 <= explore <= 1.0:
        raise ValueError("router.explore must be between 0 and 1")
    load_window = float(router.get("load_window_s", 5.0))
    if load_window < 0:
        raise ValueError("router.load_window_s must not be negative")
    images = dict(raw.get("images") or {})
    unknown = set(images) - set(ImageLimits.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown images fields: {', '.join(sorted(unknown))}")
    return AppConfig(
        models=models,
        tiers=tiers,
        api_key_env=raw.get("api_key_env", "TRISERVE_API_KEY"),
        ingress_num_cpus=float(ingress.get("num_cpus", 0.25)),
        ingress_replicas=int(ingress.get("num_replicas", 1)),
        images=ImageLimits(**images),
        explore=explore,
        load_window_s=load_window,
        max_body_bytes=int(max_body_mb * 2**20),
        request_timeout_s=timeout,
        shutdown_grace_s=grace,
    )


def load_config(path: str | Path | None = None) -> AppConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    return parse_config(yaml.safe_load(path.read_text()), base=path.parent)

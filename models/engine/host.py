"""What an engine driver runs beside the engine, and how a served model's engine is built.

``EngineHost`` is the engine plus the VLM whose language model it drives (None for a text model).
Work that must not race a step (a scoring pass, encoding a request's images) runs on the engine's
thread or process as ``fn(host, *args)``: the functions here are module-level so that they can be
sent to an engine process by name. ``load_host`` builds a host from an ``EngineSettings``, in the
replica itself or in its engine process (models/engine/engine_process.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from models.engine.costs import split_option
from models.engine.engine import Engine


@dataclass
class EngineHost:
    engine: Engine
    vlm: Any = None  # a VLM's encoder and projector; ``engine.model`` is its language model
    info: dict[str, Any] = field(default_factory=dict)  # what loading found: dtype, warm-up seconds, priors


@dataclass(frozen=True)
class EngineSettings:
    """How to load one served model and build its engine (picklable: sent to an engine process)."""

    path: str
    dtype: str | None = None
    device: str = "cpu"
    threads: int = 1
    int8_drafts: bool = False  # TriModeModel.int8_drafts
    engine: dict[str, Any] = field(default_factory=dict)  # Engine keyword arguments (pages, limits, ...)


def build_engine(model, settings: EngineSettings, warm: bool = True) -> tuple[Engine, dict[str, Any]]:
    """The engine of a loaded model with the router's priors for this device (``triserve calibrate``),
    after a warm-up decode (``warm``); and what was found, for the replica's log (with CUDA graphs, how
    many were captured and in how many seconds: AR steps, and what a lone request comes to at each block
    length the router may choose: the calibrated ones, else the calibration's and the model's own)."""
    from models.calibration import DEFAULT_BLOCKS, device_key, load_priors
    from models.generate import warm_up
    from models.native_forward import drafts_in_int8

    info: dict[str, Any] = {"dtype": str(model.dtype).removeprefix("torch.")}
    if warm:
        info["warm_up_s"] = warm_up(model)
    with torch.inference_mode():
        int8_drafts = drafts_in_int8(model)
    info["int8_drafts"] = int8_drafts
    device = device_key(settings.device, settings.threads, model.dtype, int8_drafts)
    priors = load_priors(settings.path, device)
    info["device"], info["calibrated"] = device, bool(priors)
    start = time.perf_counter()
    engine = Engine(model, **settings.engine, priors=priors)
    if engine.runner.graphs is not None:  # AR steps' captured while the engine was built
        blocks = {block for key in priors or () if (block := split_option(key)[1])}
        blocks = sorted(blocks or {*DEFAULT_BLOCKS, model.config.block_size})
        info["cuda_graphs"], info["cuda_graph_blocks"] = engine.runner.graphs.precapture(blocks), blocks
        info["cuda_graphs_s"] = time.perf_counter() - start
    return engine, info


def load_host(settings: EngineSettings) -> EngineHost:
    """Load the checkpoint (a text model or a VLM) on the settings' device and threads, warm it up
    and build its engine."""
    from models.loading import load_model
    from models.vlm import load_vlm, read_config

    torch.set_num_threads(settings.threads)
    vlm = None
    if read_config(settings.path)[1] is not None:
        vlm = load_vlm(settings.path, dtype=settings.dtype, device=settings.device, tokenizer=False, warm_up=False)
        model = vlm.language_model
        model.int8_drafts = settings.int8_drafts
    else:
        model = load_model(
            settings.path,
            dtype=settings.dtype,
            device=settings.device,
            tokenizer=False,
            warm_up=False,
            int8_drafts=settings.int8_drafts,
        )  # build_engine warms it up
    engine, info = build_engine(model, settings)
    info["vlm"] = vlm is not None
    return EngineHost(engine, vlm, info)


def score_top(host: EngineHost, token_ids: list[int], top: int) -> list[tuple[float, dict[int, float]]]:
    """AR log-probabilities of a prompt's tokens and the ``top`` alternatives (echo + logprobs)."""
    from models.generate import score_with_top

    return score_with_top(host.engine.model, token_ids, top)


def prompt_embeds(host: EngineHost, prompt: list[int], images: list) -> Any:
    """The embeddings a VLM request's prefill places on its image placeholders (the replica has checked
    that the model is a VLM)."""
    return host.vlm.prompt_embeds(prompt, images)

"""``triserve calibrate``: what each decoding option costs and yields on this device.

Per option (AR, and diffusion / linear_spec / quadratic_spec at each block length) the engine
decodes a small built-in prompt set greedily, first one request at a time, then ``batch`` at once.
From the decode steps (prefill steps are left out) it takes a lone request's step time (the
median), what each further request adds to a step (a least-squares slope over the steps' request
counts) and the tokens per forward of the lone runs; a speculative option's lone runs are then decoded
once more as a replica serves them (each request judged by its own cycles, with the figures just
measured), and their tokens per forward are what is kept. The figures go to
``MODEL/triserve_calibration.json`` under a key naming the device (CPU model and thread count, or
the GPU's name) and the compute dtype, so a folder shared between machines keeps one entry per kind of device; a replica
loads the entry for its own device as the router's priors (models/engine/costs.py).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from models.engine.costs import OptionStats, effective_tpf, option_key, split_option
from models.model import TriModeModel

CALIBRATION_FILE = "triserve_calibration.json"
BLOCK_MODES = ("diffusion", "linear_spec", "quadratic_spec")
DEFAULT_BLOCKS = (8, 16, 32)

# Short openings of the kinds of text the family serves (code first, as the bundled model is a code
# model); the model continues each greedily, so what matters is that they are ordinary.
PROMPTS = (
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n",
    "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(",
    "class Stack:\n    def __init__(self):\n        self._items = []\n\n    def push(self, item):\n",
    "    for key, value in sorted(mapping.items()):\n        if value is None:\n            continue\n",
    'def read_config(path):\n    """Return the settings stored in ``path`` as a dict."""\n    with open(path) as f:\n',
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "    try:\n        result = self._connection.execute(query, params)\n    except OSError as exc:\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
)


def device_key(device: str | torch.device, threads: int, dtype: torch.dtype, int8_drafts: bool = False) -> str:
    """What the figures hold for: the GPU's name, or the CPU's model and the threads used; the compute
    dtype (bf16 and fp32 cost differently); and whether drafts multiply in int8
    (``models.native_forward.drafts_in_int8``: drafts cost less)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{_cpu_name()}:{threads}t"
    return f"{device.type}:{name}:{str(dtype).removeprefix('torch.')}" + (":int8-drafts" if int8_drafts else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def options_for(blocks: tuple[int, ...]) -> list[str]:
    return ["ar"] + [option_key(mode, block) for mode in BLOCK_MODES for block in blocks]


def _decode(engine, prompts: list[list[int]], params) -> tuple[list[tuple[int, float]], list]:
    """All prompts at once: ((requests, seconds) of each decode step, each request's final state)."""
    states = [engine.add_request(f"cal-{i}", p, params).state for i, p in enumerate(prompts)]
    steps = []
    while engine.has_work:
        running = engine.running
        decoding = not engine.waiting and not any(r.state.prefilling for r in running.values())
        start = time.perf_counter()
        engine.step()
        if decoding:
            steps.append((len(running), time.perf_counter() - start))
    return steps, states


def _capture_graphs(engine, blocks: tuple[int, ...], keys: list[str], crowd: list[list[int]], tokens: int) -> None:
    """Where the engine replays CUDA graphs, capture them before anything is timed (a capture timed as a
    step would count against its option): every shape a lone request comes to at these block lengths
    (``StepGraphs.precapture``), and what a crowd of requests comes to by decoding every option once
    with it. (A crowded shape that first comes up later is captured then; the medians the figures take
    keep such a step from moving them.)"""
    from models.modes import DecodeParams

    if engine.runner.graphs is None:
        return
    engine.runner.graphs.precapture(list(blocks))
    for key in keys if crowd else ():
        mode, block = split_option(key)
        _decode(engine, crowd, DecodeParams(mode=mode, max_new_tokens=tokens, block_length=block))


def _slope(samples: list[tuple[int, float]]) -> float:
    """Seconds each further request adds to a step: least squares over per-count medians."""
    by_count: dict[int, list[float]] = {}
    for n, seconds in samples:
        by_count.setdefault(n, []).append(seconds)
    points = [(n, statistics.median(v), len(v)) for n, v in by_count.items()]
    total = sum(w for _, _, w in points)
    mean_n = sum(n * w for n, _, w in points) / total
    mean_s = sum(s * w for _, s, w in points) / total
    var = sum(w * (n - mean_n) ** 2 for n, _, w in points)
    if var == 0:
        return 0.0
    return max(sum(w * (n - mean_n) * (s - mean_s) for n, s, w in points) / var, 0.0)


@torch.inference_mode()
def calibrate(
    model: TriModeModel,
    *,
    blocks: tuple[int, ...] = DEFAULT_BLOCKS,
    prompts: int = len(PROMPTS),
    max_new_tokens: int = 64,
    batch: int = 8,
    rounds: int = 2,
    progress: Callable[[str, OptionStats], None] | None = None,
    cuda_graphs: bool = True,
) -> dict[str, OptionStats]:
    """Measure every option, the options interleaved over ``rounds`` (at most one per prompt);
    ``progress`` hears about each at the end. ``cuda_graphs``: on a CUDA model, steps replay CUDA
    graphs as a served replica's do (``Engine``'s ``cuda_graphs``, on by default there)."""
    if not 1 <= prompts <= len(PROMPTS):
        raise ValueError(f"prompts must be between 1 and {len(PROMPTS)}")
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    rounds = min(rounds, prompts)
    if batch < 1 or max_new_tokens < 1 or not blocks or min(blocks) < 2:
        raise ValueError("batch and max_new_tokens must be positive and block lengths at least 2")
    from models.engine import Engine
    from models.modes import SPECULATIVE_MODES, DecodeParams

    tok = model.tokenizer
    ids = [[tok.bos_token_id] + tok.encode(text, add_special_tokens=False) for text in PROMPTS[:prompts]]
    crowd = [ids[i % len(ids)] for i in range(batch)]
    pages = batch * (-(-(max(map(len, ids)) + max_new_tokens + 2 * max(blocks) + 1) // 16) + 1)
    engine = Engine(
        model,
        num_pages=pages,
        max_running=batch,
        max_step_tokens=1 << 16,
        prefix_caching=False,
        speculation_max_batch=None,  # every option is measured as it is, crowded too
        cuda_graphs=cuda_graphs,
    )
    keys = options_for(blocks)
    _capture_graphs(engine, blocks, keys, crowd, max_new_tokens)
    lone: dict[str, list[tuple[int, float]]] = {key: [] for key in keys}
    crowded: dict[str, list[tuple[int, float]]] = {key: [] for key in keys}
    tpfs: dict[str, list[float]] = {key: [] for key in keys}
    # Options take turns, round after round, each round a share of the prompts and of the crowd's
    # tokens: measured one after another, a machine whose speed drifts (a shared VM's does, by up to
    # 2x) made AR look as slow as a 16-row draft and sent speculation to a loaded replica.
    for r in range(rounds):
        for key in keys:
            mode, block = split_option(key)
            params = DecodeParams(mode=mode, max_new_tokens=max_new_tokens, block_length=block)
            for prompt in ids[r::rounds]:
                steps, states = _decode(engine, [prompt], params)
                lone[key] += steps
                tpfs[key] += [state.tpf for state in states if state.tpf]
            share = replace(params, max_new_tokens=max(1, max_new_tokens // rounds))
            crowded[key] += _decode(engine, crowd, share)[0]
    results = {
        key: OptionStats(
            tpf=statistics.fmean(tpfs[key]),
            step_s=statistics.median(s for _, s in lone[key]),
            per_request_s=_slope(lone[key] + crowded[key]),
        )
        for key in keys
    }
    # A served speculative request is judged by its own cycles (models/engine/engine.py): it takes AR
    # steps while they do not pay. Its option's TPF is what the router predicts speed from, so the lone
    # runs of speculative options are decoded again as served, judged by the figures just measured,
    # each AR step they held counted at its cost, as the engine counts a finished request's TPF.
    judged = Engine(
        model, num_pages=pages, max_step_tokens=1 << 16, prefix_caching=False, priors=results, cuda_graphs=cuda_graphs
    )
    _capture_graphs(judged, blocks, keys, [], max_new_tokens)
    for key in keys:
        mode, block = split_option(key)
        if mode not in SPECULATIVE_MODES:
            continue
        params = DecodeParams(mode=mode, max_new_tokens=max_new_tokens, block_length=block)
        states = [state for prompt in ids for state in _decode(judged, [prompt], params)[1]]  # one at a time
        own = [effective_tpf(len(s.tokens), s.nfe, s.held_steps, results[key], results["ar"]) for s in states if s.tpf]
        results[key] = replace(results[key], tpf=statistics.fmean(own))
    for key in keys:
        if progress:
            progress(key, results[key])
    return results


def calibration_path(model_path: str | Path) -> Path:
    return Path(model_path) / CALIBRATION_FILE


def save_calibration(model_path: str | Path, device: str, options: dict[str, OptionStats], **meta) -> Path:
    """Write (or replace) this device's entry, keeping other devices' entries."""
    path = calibration_path(model_path)
    data = json.loads(path.read_text()) if path.is_file() else {"version": 1, "devices": {}}
    data["devices"][device] = {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "options": {key: {k: v for k, v in s.to_dict().items() if k != "samples"} for key, s in options.items()},
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_priors(model_path: str | Path, device: str) -> dict[str, OptionStats] | None:
    """This device's calibrated figures, or None when the model was not calibrated on such a device."""
    path = calibration_path(model_path)
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get("devices", {}).get(device)
    if entry is None:
        return None
    return {key: OptionStats(**values) for key, values in entry["options"].items()}

"""Checkpoint loading and saving in the official Hugging Face folder layout (no remote code).

Weights are streamed tensor by tensor into an uninitialised model, so peak memory is the model
plus one tensor. ``select`` lets a tensor-parallel rank read only its own slice of each tensor.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from models.config import ModelConfig
from models.matmul import cpu_has_fast_half
from models.model import ADAPTER_MODULES, LoraWeights, TriModeModel

ADAPTER_DIR = "linear_spec_lora"
PROGRESS_MIN_BYTES = 256 * 2**20  # show a progress bar for checkpoints larger than this
logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# (name, safe_open slice) -> tensor; default reads the whole tensor
Selector = Callable[[str, object], torch.Tensor]
M = TypeVar("M", bound=torch.nn.Module)


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold a loadable tri-mode model."""


def resolve_dtype(
    dtype: str | torch.dtype | None, config: ModelConfig, device: str | torch.device = "cpu"
) -> torch.dtype:
    """The compute dtype: ``dtype`` if given, else the checkpoint's, except that half-precision
    checkpoints compute in fp32 on CPUs without bf16 instructions."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or config.torch_dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; use one of {sorted(set(_DTYPES))}")
    chosen = _DTYPES[name]
    if dtype is None and chosen != torch.float32 and torch.device(device).type == "cpu" and not cpu_has_fast_half():
        return torch.float32
    return chosen


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = {name: folder / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"shard {file.name} listed in {index.name} is missing")
        return files
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")


def _check_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    return folder


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    select: Selector | None = None,
    adapter: bool = True,
    tokenizer: bool = True,
    build: Callable[[ModelConfig], TriModeModel] | None = None,
    warm_up: bool = True,
    int8_drafts: bool = False,
) -> TriModeModel:
    """Load a checkpoint folder into a ready-to-run model (eval mode, on ``device``).

    ``select`` and ``build`` are the tensor-parallel hooks: ``build`` makes a model whose linears
    are already sharded, ``select`` reads each tensor's slice for this rank. ``warm_up``: run
    ``models.generate.warm_up`` before returning, so that what a first forward prepares (the products'
    backends for this thread count, the RoPE table, a draft adapter's merged weights) is not paid by
    the first request (about 0.4 s of a first 128-token decode of the bundled model, otherwise); its
    seconds are logged. Training turns it off, and so do tensor-parallel ranks, which can only run a
    forward together. ``int8_drafts``: speculative drafts multiply in int8 where the CPU allows
    (``TriModeModel.int8_drafts``).
    """
    folder = _check_folder(path)
    config = ModelConfig.from_file(folder)
    torch_dtype = resolve_dtype(dtype, config, device)
    model = build_empty(lambda: (build or TriModeModel)(config), device)
    load_weights(model, folder, dtype=torch_dtype, select=select)
    if adapter and (folder / ADAPTER_DIR).is_dir():
        load_adapter(model, folder / ADAPTER_DIR, select=select)
    if tokenizer and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        model.tokenizer = load_tokenizer(folder)
    model.source = str(folder)
    model.int8_drafts = int8_drafts
    model.eval()
    if warm_up:
        warm_up_loaded(model)
    return model


def build_empty(build: Callable[[], M], device: torch.device | str) -> M:
    """``build()`` on the meta device, then given uninitialised storage on ``device`` for the weights to
    be loaded into. (Not ``Module.to_empty``: its ``empty_like`` of a meta tensor takes a Python path
    that imports sympy, about 0.3 s of a process's first load.)"""
    with torch.device("meta"):
        model = build()
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    return model


def warm_up_loaded(model: TriModeModel) -> None:
    """``models.generate.warm_up`` on a model just loaded (``load_model`` and ``models.vlm.load_vlm``
    with ``warm_up``), its seconds logged."""
    from models.generate import warm_up

    logger.info("warmed up %s in %.2f s", Path(model.source).name, warm_up(model))


def ar_checkpoint_name(name: str) -> str:
    """The tri-mode name of a tensor of a plain AR checkpoint (Mistral/Ministral/Llama layout)."""
    if name.startswith("model."):
        return "encoder." + name[len("model.") :]
    if name.startswith("lm_head."):
        return "diffusion_head." + name[len("lm_head.") :]
    return name


def load_weights(
    model: TriModeModel,
    folder: Path,
    *,
    dtype: torch.dtype,
    select: Selector | None = None,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Stream a folder's tensors into ``model``; ``rename`` maps checkpoint names to the model's."""
    stored = weight_files(folder)
    original = {rename(name) if rename else name: name for name in stored}
    files = {name: stored[original[name]] for name in original}
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(files))
    unexpected = sorted(set(files) - set(params))
    if missing:
        raise CheckpointError(
            f"checkpoint is missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint has unexpected tensors: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "")
        )
    total = sum(p.numel() * p.element_size() for p in params.values())
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=total < PROGRESS_MIN_BYTES)
    with torch.no_grad():
        for file, names in sorted(by_file.items()):
            with safe_open(file, framework="pt") as f:
                for name in names:
                    param = params[name]
                    key = original[name]
                    tensor = select(name, f.get_slice(key)) if select else f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise CheckpointError(
                            f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}"
                        )
                    param.data = tensor.to(device=param.device, dtype=dtype)
                    bar.update(param.numel() * param.element_size())
    bar.close()


_LORA_KEY = re.compile(
    r"layers\.(\d+)\.(self_attn\.o_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])(?:\.default)?\.weight$"
)


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup for one projection's short name (``down_proj``):
    a key applies when the module's name ends with it (as PEFT matches keys against module names)."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", ADAPTER_MODULES[module]):
            return value
    return default


def load_adapter(model: TriModeModel, folder: Path, *, select: Selector | None = None) -> None:
    """Attach a PEFT LoRA draft adapter: on o_proj (the official linear-spec drafter), and optionally on the
    MLP's projections (``target_modules`` any of ``ADAPTER_MODULES``; per-module ranks via ``rank_pattern``).
    Its factors are held in fp32 whatever the model's dtype (see ``LoraWeights``)."""
    config_file = folder / "adapter_config.json"
    weights_file = folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise CheckpointError(f"adapter folder {folder} needs adapter_config.json and adapter_model.safetensors")
    cfg = json.loads(config_file.read_text())
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not set(targets) <= set(ADAPTER_MODULES):
        raise CheckpointError(
            f"draft adapter must target some of {sorted(ADAPTER_MODULES)}, found target_modules={targets}"
        )
    by_path = {path: name for name, path in ADAPTER_MODULES.items()}
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(weights_file, framework="pt") as f:
        for name in f.keys():
            match = _LORA_KEY.search(name)
            if not match or by_path[match.group(2)] not in targets:
                raise CheckpointError(f"unexpected tensor in adapter: {name}")
            layer, module, which = int(match.group(1)), by_path[match.group(2)], match.group(3)
            # row-parallel projections (o, down) split lora_A along its input; column-parallel ones lora_B
            tensor = select(f"adapter.{which}.{name}", f.get_slice(name)) if select else f.get_tensor(name)
            found.setdefault((layer, module), {})[which] = tensor.to(device=model.device, dtype=torch.float32)
    layers = model.encoder.layers
    for module in targets:
        rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", rank)))
        scale = alpha / rank**0.5 if cfg.get("use_rslora") else alpha / rank
        for index, layer in enumerate(layers):
            pair = found.get((index, module), {})
            if set(pair) != {"A", "B"}:
                raise CheckpointError(f"adapter is missing lora_A/lora_B of {module} for layer {index}")
            a, b = pair["A"], pair["B"]
            weight = layer.get_submodule(ADAPTER_MODULES[module]).weight
            if a.shape != (rank, weight.shape[1]) or b.shape != (weight.shape[0], rank):
                raise CheckpointError(
                    f"adapter shape mismatch at layer {index}: "
                    f"A {tuple(a.shape)}, B {tuple(b.shape)} for {module} {tuple(weight.shape)} at rank {rank}"
                )
            layer.set_lora(module, LoraWeights(a=a, b=b, scale=scale))
    extra = sorted({index for index, _ in found} - set(range(len(layers))))
    if extra:
        raise CheckpointError(f"adapter has layers the model does not: {extra}")


def load_tokenizer(folder: str | Path):
    """The checkpoint's own tokenizer through transformers.AutoTokenizer (no remote code)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json too and warns about the architecture it does not know
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(previous)


def save_model(
    model: TriModeModel, path: str | Path, *, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None
) -> None:
    """Write config.json, generation_config.json and model.safetensors (sharded past ``max_shard_bytes``)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {
        name: (p.detach().to(dtype) if dtype else p.detach()).contiguous().cpu() for name, p in model.named_parameters()
    }
    save_dtype = next(iter(tensors.values())).dtype
    raw = config.to_dict()
    raw["torch_dtype"] = str(save_dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (folder / "generation_config.json").write_text(json.dumps({**generation, "do_sample": False}, indent=2) + "\n")
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        (folder / stale).unlink(missing_ok=True)
    if max_shard_bytes is None:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

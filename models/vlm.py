"""The vision-language model: a Pixtral-style encoder and a Mistral3-style projector in front of the
tri-mode text model.

Image placeholder tokens in the prompt are replaced by projected patch embeddings before the
decoder. They belong to the committed causal prefix (the prompt prefill), so every decoding mode,
the engine and the router run unchanged: only a request's prefill segments carry embeddings.

Checkpoints use the official folder layout: ``config.json`` with ``model_type:
nemotron_labs_diffusion_vlm``, ``text_config``, ``vision_config`` and the projector fields; tensors
``vision_tower.*``, ``multi_modal_projector.*`` and the text model's ``encoder.*`` /
``diffusion_head.*`` under a prefix read from the checkpoint (the ones seen in the wild).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.config import ConfigError, ModelConfig
from models.loading import (
    CheckpointError,
    Selector,
    _check_folder,
    build_empty,
    load_tokenizer,
    load_weights,
    resolve_dtype,
    save_model,
    warm_up_loaded,
    weight_files,
)
from models.model import TriModeModel
from models.segments import PromptEmbeds
from vision.config import VisionConfig
from vision.encoder import VisionEncoder
from vision.preprocess import ImageTokens
from vision.projector import Projector

VLM_MODEL_TYPE = "nemotron_labs_diffusion_vlm"
TEXT_MODEL_TYPE = "nemotron_labs_diffusion"
# top-level keys a VLM config may carry for its text model (the text_config wins when it has them)
_SHARED_TEXT_KEYS = ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "block_size", "torch_dtype")
# where the text model's tensors sit, by checkpoint style; and the vision parts' prefixes
TEXT_PREFIXES = ("", "language_model.", "model.language_model.", "language_model.model.")
VISION_PREFIXES = ("vision_tower.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


@dataclass(frozen=True)
class VLMConfig:
    text: ModelConfig
    vision: VisionConfig
    image_token_id: int
    image_break_token_id: int | None = None
    image_end_token_id: int | None = None
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = False
    vision_feature_layer: int = -1
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> VLMConfig:
        if raw.get("model_type") != VLM_MODEL_TYPE:
            raise ConfigError(f"model_type {raw.get('model_type')!r} is not {VLM_MODEL_TYPE!r}")
        for key in ("text_config", "vision_config"):
            if not isinstance(raw.get(key), dict):
                raise ConfigError(f"config.json is missing required field '{key}'")
        image_token = raw.get("image_token_index", raw.get("image_token_id"))
        if image_token is None:
            raise ConfigError("config.json is missing required field 'image_token_index'")
        text_raw = {k: raw[k] for k in _SHARED_TEXT_KEYS if raw.get(k) is not None}
        # the text model is this family's decoder whatever name the VLM file gives its text_config
        text_raw.update({**raw["text_config"], "model_type": TEXT_MODEL_TYPE})
        layer = raw.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer must be one layer index, found {layer!r}")
        merge = int(raw.get("spatial_merge_size", 2))
        vision = VisionConfig.from_dict(raw["vision_config"], preprocessor)
        if not -vision.num_hidden_layers - 1 <= layer <= vision.num_hidden_layers or merge < 1:
            raise ConfigError(f"vision_feature_layer {layer} / spatial_merge_size {merge} out of range")
        known = {"model_type", "architectures", "text_config", "vision_config", "image_token_index", "image_token_id",
                 "image_break_token_id", "image_end_token_id", "spatial_merge_size", "projector_hidden_act",
                 "multimodal_projector_bias", "vision_feature_layer", *_SHARED_TEXT_KEYS}  # fmt: skip
        return cls(
            text=ModelConfig.from_dict(text_raw),
            vision=vision,
            image_token_id=int(image_token),
            image_break_token_id=raw.get("image_break_token_id"),
            image_end_token_id=raw.get("image_end_token_id"),
            spatial_merge_size=merge,
            projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
            multimodal_projector_bias=bool(raw.get("multimodal_projector_bias", False)),
            vision_feature_layer=layer,
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        text = self.text.to_dict()
        text.pop("architectures", None)
        out = {
            "architectures": ["NemotronLabsDiffusionVLModel"],
            **self.extra,
            "model_type": VLM_MODEL_TYPE,
            "text_config": text,
            "vision_config": self.vision.to_dict(),
            "image_token_index": self.image_token_id,
            "spatial_merge_size": self.spatial_merge_size,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "vision_feature_layer": self.vision_feature_layer,
        }
        for key in ("image_break_token_id", "image_end_token_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in _SHARED_TEXT_KEYS:
            out[key] = text[key]
        return out

    @property
    def bos_token_id(self) -> int | None:  # the generation_config.json fields save_model writes
        return self.text.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.text.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.text.pad_token_id

    def image_tokens(self, tokenizer=None) -> ImageTokens:
        """Placeholder ids: from the config, else the tokenizer's ``[IMG_BREAK]`` / ``[IMG_END]``."""
        ids = {"break": self.image_break_token_id, "end": self.image_end_token_id}
        for key, name in (("break", "[IMG_BREAK]"), ("end", "[IMG_END]")):
            if ids[key] is None and tokenizer is not None:
                found = tokenizer.convert_tokens_to_ids(name)
                ids[key] = found if found != tokenizer.unk_token_id else None
            if ids[key] is None:
                raise ConfigError(
                    f"no id for {name}: set image_{key}_token_id in config.json or add it to the tokenizer"
                )
        return ImageTokens(image=self.image_token_id, row_break=int(ids["break"]), end=int(ids["end"]))


def read_config(path: str | Path) -> tuple[ModelConfig, VLMConfig | None]:
    """The text model's config of any checkpoint folder, plus the VLM config when it is a VLM."""
    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    if raw is None or raw.get("model_type") != VLM_MODEL_TYPE:
        return ModelConfig.from_file(folder), None
    pre_file = folder / "preprocessor_config.json"
    config = VLMConfig.from_dict(raw, json.loads(pre_file.read_text()) if pre_file.is_file() else None)
    return config.text, config


class VisionLanguageModel(nn.Module):
    """Encoder + projector + the tri-mode text model; attribute names are the checkpoint prefixes."""

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionEncoder(config.vision)
        self.multi_modal_projector = Projector(
            config.vision.hidden_size,
            config.text.hidden_size,
            merge=config.spatial_merge_size,
            act=config.projector_hidden_act,
            bias=config.multimodal_projector_bias,
            eps=config.text.rms_norm_eps,
        )
        self.language_model = TriModeModel(config.text)

    @property
    def feature_layers(self) -> int:
        """Encoder blocks to run: ``vision_feature_layer`` counts the patch embedding as layer 0."""
        layer = self.config.vision_feature_layer
        return layer if layer >= 0 else self.config.vision.num_hidden_layers + 1 + layer

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Same-size images [B, C, H, W] -> projected patch embeddings [B, rows*cols, text hidden]."""
        unit = self.config.vision.patch_size
        features = self.vision_tower(pixels, self.feature_layers)
        rows, cols = pixels.shape[-2] // unit, pixels.shape[-1] // unit
        return self.multi_modal_projector(features, rows, cols)

    @torch.inference_mode()
    def prompt_embeds(self, prompt: list[int], images: list[np.ndarray | torch.Tensor]) -> PromptEmbeds:
        """Encode each image once and place its embeddings on the prompt's image placeholders, in order."""
        device, dtype = self.language_model.device, self.language_model.dtype
        values = torch.cat(
            [self.image_embeddings(torch.as_tensor(img, device=device, dtype=dtype)[None])[0] for img in images]
        )
        rows = [i for i, t in enumerate(prompt) if t == self.config.image_token_id]
        if len(rows) != len(values):
            raise ValueError(f"prompt has {len(rows)} image placeholders but the images give {len(values)} embeddings")
        return PromptEmbeds(rows=rows, values=values)


def _split_prefix(names: set[str], anchor: str, prefixes: tuple[str, ...], part: str) -> str:
    """The prefix under which ``anchor`` sits, if it is one of the accepted ones; a clear error otherwise."""
    found = sorted(n[: -len(anchor)] for n in names if n.endswith(anchor))
    for prefix in prefixes:
        if prefix in found:
            return prefix
    accepted = ", ".join(repr(p) for p in prefixes)
    seen = ", ".join(repr(p) for p in found) or "none"
    raise CheckpointError(f"{part}: expected '{anchor}' under one of the prefixes {accepted}; found prefixes: {seen}")


def checkpoint_renamer(names: set[str]):
    """Map a VLM checkpoint's tensor names to the model's (``vision_tower.``, ``multi_modal_projector.``,
    ``language_model.``), detecting each part's prefix from the checkpoint itself."""
    vision = _split_prefix(names, "patch_conv.weight", VISION_PREFIXES, "vision tower")
    projector = _split_prefix(names, "linear_1.weight", PROJECTOR_PREFIXES, "projector")
    text = _split_prefix(names, "encoder.embed_tokens.weight", TEXT_PREFIXES, "text model")
    head_names = {n for n in names if n.endswith("diffusion_head.weight")}
    head = next((h for h in (text + "diffusion_head.weight", "diffusion_head.weight") if h in head_names), None)
    if head is None:
        raise CheckpointError(f"text model: no diffusion_head.weight (found: {sorted(head_names) or 'none'})")

    def rename(name: str) -> str:
        if name == head:
            return "language_model.diffusion_head.weight"
        for prefix, target in ((vision, "vision_tower."), (projector, "multi_modal_projector.")):
            if name.startswith(prefix):
                return target + name[len(prefix) :]
        if name.startswith(text):
            return "language_model." + name[len(text) :]
        return name  # reported as unexpected by load_weights

    return rename


def load_vlm(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tokenizer: bool = True,
    select: Selector | None = None,
    build_text: Callable[[ModelConfig], TriModeModel] | None = None,
    warm_up: bool = True,
) -> VisionLanguageModel:
    """Load a VLM checkpoint folder (eval mode). ``model.language_model`` is what the engine runs.

    ``select`` and ``build_text`` are the tensor-parallel hooks, and ``warm_up`` warms the decoder up,
    as in ``load_model`` (``select`` sees the model's tensor names, ``language_model.*`` for the decoder)."""
    folder = _check_folder(path)
    _, config = read_config(folder)
    if config is None:
        raise CheckpointError(f"{folder} is not a {VLM_MODEL_TYPE} checkpoint")
    torch_dtype = resolve_dtype(dtype, config.text, device)

    def build() -> VisionLanguageModel:
        model = VisionLanguageModel(config)
        if build_text is not None:
            model.language_model = build_text(config.text)
        return model

    model = build_empty(build, device)
    rename = checkpoint_renamer(set(weight_files(folder)))
    load_weights(model, folder, dtype=torch_dtype, select=select, rename=rename)
    if tokenizer and (folder / "tokenizer.json").is_file():
        model.language_model.tokenizer = load_tokenizer(folder)
    model.language_model.source = str(folder)
    model.eval()
    if warm_up:
        warm_up_loaded(model.language_model)
    return model


def save_vlm(model: VisionLanguageModel, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write the official layout: config.json (VLM), generation_config.json, model.safetensors."""
    save_model(model, path, dtype=dtype)
    raw = model.config.to_dict()
    saved = next(model.parameters()).dtype if dtype is None else dtype
    raw["torch_dtype"] = raw["text_config"]["torch_dtype"] = str(saved).replace("torch.", "")
    (Path(path) / "config.json").write_text(json.dumps(raw, indent=2) + "\n")

"""Configuration of the vision side of a VLM: the Pixtral-style encoder and the image limits.

Parsed from the ``vision_config`` block of an official VLM ``config.json`` (plus, when the folder
has one, ``preprocessor_config.json``). Fields the architecture page cannot confirm are read from
the file with the Pixtral defaults as fallbacks, never hard-coded in the modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from models.config import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Pixtral's processor defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("silu", "gelu")


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    head_dim: int = 64
    num_channels: int = 3
    image_size: int = 1540  # longest side after resizing
    patch_size: int = 14
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> VisionConfig:
        raw = dict(raw)
        pre = preprocessor or {}
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size"):
            if raw.get(key) is None:
                raise ConfigError(f"config.json is missing required field 'vision_config.{key}'")
        heads = int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or int(raw["hidden_size"]) // heads)
        if head_dim % 4:
            raise ConfigError(f"vision head_dim ({head_dim}) must be a multiple of 4 for 2D rotary embeddings")
        act = raw.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"unsupported vision_config.hidden_act {act!r}; expected one of {', '.join(ACTIVATIONS)}")
        rope = raw.get("rope_parameters") or {}
        size = pre.get("size")
        longest = size.get("longest_edge") if isinstance(size, dict) else None  # preprocessor_config.json
        mean = tuple(float(v) for v in (raw.get("image_mean") or pre.get("image_mean") or CLIP_MEAN))
        std = tuple(float(v) for v in (raw.get("image_std") or pre.get("image_std") or CLIP_STD))
        channels = int(raw.get("num_channels", 3))
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ConfigError(f"image_mean/image_std need {channels} values (std positive)")
        known = {
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
            "num_channels", "image_size", "patch_size", "hidden_act", "rope_theta", "rope_parameters",
            "rms_norm_eps", "image_mean", "image_std",
        }  # fmt: skip
        return cls(
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw.get("intermediate_size") or 4 * int(raw["hidden_size"])),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            head_dim=head_dim,
            num_channels=channels,
            image_size=int(longest or raw.get("image_size") or 1540),
            patch_size=int(raw["patch_size"]),
            hidden_act=act,
            rope_theta=float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0),
            rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-5),
            image_mean=mean,
            image_std=std,
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        out = {"model_type": "pixtral", **self.extra, **asdict(self)}
        out.pop("extra")
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return out

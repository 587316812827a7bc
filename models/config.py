"""Model configuration parsed from an official Nemotron-Labs-Diffusion ``config.json``.

Only the fields the architecture needs are typed here; every other key of the file is kept in
``extra`` so that nothing a checkpoint carries is lost on a save/load round trip.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("nemotron_labs_diffusion",)

_REQUIRED = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "mask_token_id",
)


class ConfigError(ValueError):
    """A config.json that triserve cannot serve (missing field, unsupported type, bad value)."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters: plain RoPE or YaRN, plus Llama-4 query scaling."""

    rope_type: str = "default"
    theta: float = 1_000_000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    llama_4_scaling_beta: float | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any] | None, fallback_theta: float | None) -> RopeConfig:
        params = dict(params or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"unsupported rope_type {rope_type!r} (expected 'default' or 'yarn')")
        theta = params.get("rope_theta", fallback_theta)
        if theta is None:
            raise ConfigError("config.json is missing required field 'rope_parameters.rope_theta'")
        if rope_type == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if params.get(key) is None:
                    raise ConfigError(f"config.json is missing required field 'rope_parameters.{key}'")
        return cls(
            rope_type=rope_type,
            theta=float(theta),
            factor=float(params.get("factor") or 1.0),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
            llama_4_scaling_beta=params.get("llama_4_scaling_beta"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "yarn":
            out.update(
                factor=self.factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
                beta_fast=self.beta_fast,
                beta_slow=self.beta_slow,
                mscale=self.mscale,
                mscale_all_dim=self.mscale_all_dim,
            )
            if self.attention_factor is not None:
                out["attention_factor"] = self.attention_factor
        if self.llama_4_scaling_beta is not None:
            out["llama_4_scaling_beta"] = self.llama_4_scaling_beta
        return out

    @property
    def yarn_attention_factor(self) -> float:
        """The cos/sin multiplier YaRN prescribes (1.0 for plain RoPE)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale_of(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return mscale_of(self.factor, self.mscale) / mscale_of(self.factor, self.mscale_all_dim)
        return mscale_of(self.factor)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one tri-mode checkpoint (ARCHITECTURE.md section 1)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mask_token_id: int
    rope: RopeConfig
    model_type: str = "nemotron_labs_diffusion"
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    block_size: int = 32
    max_position_embeddings: int = 32768
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        for key in _REQUIRED:
            if raw.get(key) is None:
                raise ConfigError(f"config.json is missing required field '{key}'")
        if raw["model_type"] not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {raw['model_type']!r}; triserve serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ConfigError(f"{flag}=true is not part of this model family")
        if raw.get("tie_word_embeddings"):
            raise ConfigError("tie_word_embeddings=true: this family has an untied diffusion_head")
        heads, kv_heads = int(raw["num_attention_heads"]), int(raw["num_key_value_heads"])
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        head_dim = raw.get("head_dim") or int(raw["hidden_size"]) // heads
        rope = RopeConfig.from_dict(raw.get("rope_parameters") or raw.get("rope_scaling"), raw.get("rope_theta"))
        known = set(_REQUIRED) | {
            "head_dim",
            "rope_parameters",
            "rope_scaling",
            "rope_theta",
            "rms_norm_eps",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "block_size",
            "max_position_embeddings",
            "torch_dtype",
            "dtype",
        }
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            mask_token_id=int(raw["mask_token_id"]),
            rope=rope,
            model_type=raw["model_type"],
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=raw.get("pad_token_id"),
            block_size=int(raw.get("block_size") or 32),
            max_position_embeddings=int(raw.get("max_position_embeddings") or 32768),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The official config.json layout, extra keys included."""
        out: dict[str, Any] = {
            "architectures": ["NemotronLabsDiffusionModel"],
            **self.extra,
        }
        plain = asdict(self)
        for key in ("rope", "extra"):
            plain.pop(key)
        out.update(plain)
        out["rope_parameters"] = self.rope.to_dict()
        out.setdefault("attention_bias", False)
        out.setdefault("mlp_bias", False)
        out.setdefault("tie_word_embeddings", False)
        out.setdefault("hidden_act", "silu")
        return out

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def num_parameters(self) -> int:
        """Parameters of the text model (embedding, layers, norm, head)."""
        h, i = self.hidden_size, self.intermediate_size
        attention = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        layer = attention + 3 * h * i + 2 * h
        return 2 * self.vocab_size * h + self.num_hidden_layers * layer + h

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

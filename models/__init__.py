"""The Nemotron-Labs-Diffusion model family in plain PyTorch (no Ray, no remote code)."""

from models.config import ConfigError, ModelConfig
from models.generate import Generation, generate, score
from models.loading import CheckpointError, load_model, save_model
from models.model import TriModeModel
from models.modes import MODES, DecodeParams

__all__ = [
    "MODES",
    "CheckpointError",
    "ConfigError",
    "DecodeParams",
    "Generation",
    "ModelConfig",
    "TriModeModel",
    "generate",
    "load_model",
    "save_model",
    "score",
]

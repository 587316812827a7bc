"""The Nemotron-Labs-Diffusion model family in plain PyTorch (no Ray, no remote code)."""

from models.config import ConfigError, ModelConfig
from models.controls import SamplingControls
from models.generate import Generation, generate, score, warm_up
from models.infill import Infill, infill
from models.loading import CheckpointError, load_model, save_model
from models.model import TriModeModel
from models.modes import MODES, DecodeParams
from models.vlm import VisionLanguageModel, VLMConfig, load_vlm, save_vlm

__all__ = [
    "MODES",
    "CheckpointError",
    "ConfigError",
    "DecodeParams",
    "Generation",
    "Infill",
    "ModelConfig",
    "TriModeModel",
    "VLMConfig",
    "VisionLanguageModel",
    "generate",
    "SamplingControls",
    "infill",
    "load_model",
    "load_vlm",
    "save_model",
    "save_vlm",
    "score",
    "warm_up",
]

"""Retrofit training: typed config, the distillation loop, atomic checkpoints."""
from .checkpoint import CheckpointError, CheckpointManager, verify_checkpoint
from .config import ModelConfig, RetrofitConfig, TrainConfig, load_recipe
from .loop import run_retrofit

__all__ = ["CheckpointError", "CheckpointManager", "ModelConfig", "RetrofitConfig", "TrainConfig", "load_recipe",
           "run_retrofit", "verify_checkpoint"]

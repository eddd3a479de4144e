"""Training and evaluation: configs, the loop, evaluation, checkpoints, torchrun support."""

from gcnet.engine.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from gcnet.engine.config import Config, apply_overrides, config_from_dict, load_config
from gcnet.engine.evaluate import evaluate
from gcnet.engine.train import NonFiniteLossError, TrainResult, train

__all__ = [
    "Checkpoint",
    "Config",
    "NonFiniteLossError",
    "TrainResult",
    "apply_overrides",
    "config_from_dict",
    "evaluate",
    "load_checkpoint",
    "load_config",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
]

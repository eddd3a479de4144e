"""The training loop of every task, evaluation, checkpoints and torchrun support."""

from gcnet.engine.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from gcnet.engine.classification import ClassificationTask
from gcnet.engine.evaluate import evaluate
from gcnet.engine.loop import NonFiniteLossError, RunParts, TrainResult
from gcnet.engine.task import StepLoss, Task

__all__ = [
    "Checkpoint",
    "ClassificationTask",
    "NonFiniteLossError",
    "RunParts",
    "StepLoss",
    "Task",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]

"""gcnet: global context modeling for convolutional networks (GCNet, Non-local, SE)."""

from gcnet._machine import retain_freed_memory
from gcnet.blocks import (
    GlobalContext,
    NonLocal,
    SimplifiedNonLocal,
    SqueezeExcite,
    get_context_block,
)
from gcnet.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "GlobalContext",
    "NonLocal",
    "SimplifiedNonLocal",
    "SqueezeExcite",
    "__version__",
    "create_model",
    "get_context_block",
    "list_models",
    "retain_freed_memory",
]

"""gcnet: global context modeling for convolutional networks (GCNet, Non-local, SE)."""

from gcnet.blocks import (
    GlobalContext,
    NonLocal,
    SimplifiedNonLocal,
    SqueezeExcite,
    get_context_block,
)

__version__ = "0.1.0"

__all__ = [
    "GlobalContext",
    "NonLocal",
    "SimplifiedNonLocal",
    "SqueezeExcite",
    "__version__",
    "get_context_block",
]

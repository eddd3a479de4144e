"""Context blocks: GC and its three-step framework, SNL, SE and the non-local block."""

from gcnet.blocks._fused import (
    composite_autograd,
    describe_onednn_products,
    fused_block_ends,
    native_kernels,
    native_kernels_available,
    onednn_products,
)
from gcnet.blocks.factory import CONTEXT_BLOCKS, ContextFactory, get_context_block
from gcnet.blocks.global_context import ContextTransform, GlobalContext
from gcnet.blocks.non_local import NonLocal
from gcnet.blocks.simplified_non_local import SimplifiedNonLocal
from gcnet.blocks.squeeze_excite import SqueezeExcite

__all__ = [
    "CONTEXT_BLOCKS",
    "ContextFactory",
    "ContextTransform",
    "GlobalContext",
    "NonLocal",
    "SimplifiedNonLocal",
    "SqueezeExcite",
    "composite_autograd",
    "describe_onednn_products",
    "fused_block_ends",
    "get_context_block",
    "native_kernels",
    "native_kernels_available",
    "onednn_products",
]

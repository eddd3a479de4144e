"""Simplified non-local block (SNL) of GCNet: the query-independent non-local block.

Cao et al., "GCNet", arXiv:1904.11492, Eq. 3:

    z_i = x_i + W_v sum_j softmax_j(W_k x_j) x_j
"""

from __future__ import annotations

from gcnet.blocks.global_context import GlobalContext


class SimplifiedNonLocal(GlobalContext):
    """SNL: attention pooling, one 1x1 transform W_v (C -> C), broadcast add.

    Args:
        channels: channels C of input and output.

    Shape:
        input and output (B, C, *positions) with 1, 2 or 3 position dims.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, reduction=None, pooling="attention", fusion="add", norm=False, relu=False)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

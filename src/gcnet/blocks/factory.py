"""Names of context blocks for configs and the CLI; strings become classes only here."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from torch import nn

from gcnet.blocks.global_context import GlobalContext
from gcnet.blocks.non_local import NonLocal
from gcnet.blocks.simplified_non_local import SimplifiedNonLocal
from gcnet.blocks.squeeze_excite import SqueezeExcite

ContextFactory = Callable[[int], nn.Module]

CONTEXT_BLOCKS: dict[str, type[nn.Module]] = {
    "gc": GlobalContext,
    "snl": SimplifiedNonLocal,
    "se": SqueezeExcite,
    "nl": NonLocal,
}


def get_context_block(name: str | None, **options: Any) -> ContextFactory | None:
    """Map a config/CLI name and its options to a constructor taking `channels`; None means no block.

    Options are checked against the block's signature now, so a misspelt key fails at
    configuration time with the list of valid ones rather than deep inside model building.
    """
    if name is None:
        return None
    if name not in CONTEXT_BLOCKS:
        raise ValueError(f"unknown block {name!r}; expected one of {sorted(CONTEXT_BLOCKS)}")
    block = CONTEXT_BLOCKS[name]
    valid = [p for p in inspect.signature(block).parameters if p != "channels"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"block {name!r} got unknown options {unknown}; expected some of {valid}")
    return functools.partial(block, **options)

"""Parsing of `gcnet info` options and input shapes (the table itself is `complexity_of(...).table()`)."""

from __future__ import annotations

import ast
from typing import Any



def parse_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE a Python literal (4, "gc", (False, True, True, True)) or a bare word."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"expected KEY=VALUE such as reduction=4, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: context=gc


def parse_shape(text: str) -> tuple[int, ...]:
    """ "3,224,224" or "3,8,224,224" (without batch) -> (1, 3, 224, 224)."""
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise ValueError(f"expected an input shape without batch such as 3,224,224, got {text!r}") from None
    if len(dims) not in (3, 4) or min(dims) < 1:
        raise ValueError(f"expected C,H,W or C,T,H,W with positive sizes, got {text!r}")
    return (1, *dims)

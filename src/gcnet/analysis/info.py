"""`gcnet info NAME`: a registered model's per-stage table of blocks, parameters and FLOPs."""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any

from gcnet.analysis.complexity import complexity_of, default_input_shape


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


def run_info(args: argparse.Namespace) -> int:
    """Print the complexity table of `args.name`; 2 on a bad name or option."""
    from gcnet.models import list_models

    if args.list or args.name is None:
        print("\n".join(list_models()))
        return 0
    try:
        options = dict(parse_option(o) for o in args.options)
        shape = parse_shape(args.input_shape) if args.input_shape else default_input_shape(args.name)
        report = complexity_of(args.name, shape, **options)
    except (ValueError, TypeError) as error:
        print(f"gcnet info: {error}", file=sys.stderr)
        return 2
    print(report.table())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `gcnet info`."""
    parser = subparsers.add_parser(
        "info", help="per-stage blocks, parameters and FLOPs of a registered model"
    )
    parser.add_argument("name", nargs="?", default=None, help="registered model, e.g. resnet50_gc_r16")
    parser.add_argument(
        "--input-shape",
        default=None,
        metavar="C,H,W",
        help="input without batch (default 3,224,224; 3,8,224,224 for video; 3,32,32 for CIFAR)",
    )
    parser.add_argument(
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, e.g. --option reduction=4 (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list the registered models")
    parser.set_defaults(handler=run_info)

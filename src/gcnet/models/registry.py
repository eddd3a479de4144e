"""The model registry: names of the papers' configurations -> builder and its preset options.

`create_model(name, **options)` builds a registered model; options override the preset ones and are
checked against what the builder accepts, so a misspelt option fails with the valid list.
Registering a name twice is an error, never a silent replacement.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
import typing
from collections.abc import Mapping
from typing import Any, Callable

import typing_extensions
from torch import nn


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder and the options that make it this configuration."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def accepted_options(builder: Callable[..., nn.Module]) -> tuple[str, ...]:
    """Keyword options a builder takes: its named parameters, or the keys of its `Unpack[TypedDict]`."""
    names = []
    for p in inspect.signature(builder).parameters.values():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.append(p.name)
        elif p.kind is p.VAR_KEYWORD:
            hint = typing.get_type_hints(builder, include_extras=True).get(p.name)
            args = (
                typing_extensions.get_args(hint)
                if typing_extensions.get_origin(hint) is typing_extensions.Unpack
                else ()
            )
            if not args:
                raise TypeError(
                    f"builder {builder.__name__} takes **{p.name} without an Unpack[TypedDict] of options"
                )
            names.extend(args[0].__annotations__)
    return tuple(names)


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    defaults: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> ModelEntry:
    """Register `builder` (with preset `defaults`) under `name`; raise if the name is taken."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].builder.__name__})")
    defaults = dict(defaults or {})
    valid = accepted_options(builder)
    unknown = sorted(set(defaults) - set(valid))
    if unknown:
        raise TypeError(
            f"{name!r}: builder {builder.__name__} has no options {unknown}; expected some of {list(valid)}"
        )
    doc = (builder.__doc__ or "").strip().splitlines()
    entry = ModelEntry(name, builder, defaults, description or (doc[0] if doc else name))
    _REGISTRY[name] = entry
    return entry


def get_model_entry(name: str) -> ModelEntry:
    """The entry registered under `name`; raise with close matches if there is none."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f"; did you mean {close}?" if close else f"; see gcnet.list_models() ({len(_REGISTRY)} models)"
        raise ValueError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def create_model(name: str, **options: Any) -> nn.Module:
    """Build the model registered as `name`, e.g. create_model("resnet50_gc_r16", num_classes=10).

    Options are the builder's (num_classes, context, reduction, stages, position, ...); they
    override the preset ones of named configurations. Unknown options raise TypeError.
    """
    entry = get_model_entry(name)
    valid = accepted_options(entry.builder)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"model {name!r} got unknown options {unknown}; expected some of {list(valid)}")
    return entry.builder(**{**entry.defaults, **options})


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of registered models, optionally filtered by a shell pattern such as "i3d_*"."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]

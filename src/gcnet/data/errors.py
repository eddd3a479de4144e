"""Corrupt or unreadable files: reported with their path, then skipped and counted or fatal."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger("gcnet.data")

OnCorrupt = Literal["skip", "error"]
ON_CORRUPT = ("skip", "error")


class CorruptFileError(RuntimeError):
    """A data file could not be decoded; `path` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"corrupt or unreadable file {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Skipped:
    """Placeholder a dataset returns for a file it skipped; the collate function drops and counts it."""

    path: str
    reason: str


def check_on_corrupt(value: str) -> OnCorrupt:
    """Return `value` if it is a known policy, else raise listing them."""
    if value not in ON_CORRUPT:
        raise ValueError(f"unknown on_corrupt {value!r}; expected one of {list(ON_CORRUPT)}")
    return value  # type: ignore[return-value]


def handle_corrupt(error: CorruptFileError, on_corrupt: OnCorrupt) -> Skipped:
    """Raise under "error"; under "skip" log the path and return a `Skipped` marker."""
    if on_corrupt == "error":
        raise error
    logger.warning("skipping %s", error)
    return Skipped(error.path, error.reason)

"""Checkpoints that lose nothing, written so that a kill at any moment leaves the last complete one.

Layout of `<out_dir>/checkpoints/`:

    step-000120-<id>/model.safetensors   weights and buffers (safetensors)
    step-000120-<id>/state.pt            optimizer, scheduler, epoch, step, RNG states, config
    last.json, best.json                 pointers {"dir": "step-000120-<id>", ...}

A checkpoint folder is filled under a temporary name (files fsynced), renamed into place, and only
then does an atomically replaced pointer file name it; older folders are removed after that.
`state.pt` holds only tensors and plain containers, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "state.pt"
POINTERS = ("last", "best")


@dataclass
class Checkpoint:
    """A loaded checkpoint: its folder, the model state dict and the trainer state."""

    path: Path
    model: dict[str, torch.Tensor]
    state: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` then fsync and rename `tmp` over `path`, so readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory; contiguous: channels_last weights.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def checkpoint_dir(out_dir: str | Path) -> Path:
    """`<out_dir>/checkpoints`."""
    return Path(out_dir) / "checkpoints"


def save_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    state: dict[str, Any],
    pointers: tuple[str, ...] = ("last",),
) -> Path:
    """Write a complete checkpoint of `model` and `state`, then point `pointers` ("last", "best") at it.

    `state` must hold only tensors and plain containers (it is read back with weights_only=True);
    it should include "epoch" and "step". Returns the checkpoint folder.
    """
    for name in pointers:
        if name not in POINTERS:
            raise ValueError(f"unknown checkpoint pointer {name!r}; expected some of {list(POINTERS)}")
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(state.get('step', 0)):09d}-{secrets.token_hex(4)}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    metadata = {"format": "pt", "gcnet_format": str(FORMAT_VERSION), "step": str(state.get("step", 0))}
    for file, write in (
        (WEIGHTS, lambda p: save_file(_weights(model), str(p), metadata=metadata)),
        (STATE, lambda p: torch.save({"format_version": FORMAT_VERSION, **state}, p)),
    ):
        write(tmp / file)
        with open(tmp / file, "rb+") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    final = root / name
    os.rename(tmp, final)
    _fsync_dir(root)
    summary = {"dir": name, "epoch": state.get("epoch"), "step": state.get("step")}
    for pointer in pointers:
        atomic_write(root / f"{pointer}.json", lambda p: p.write_text(json.dumps(summary) + "\n"))
    _prune(root)
    return final


def _pointer_target(root: Path, pointer: str) -> str | None:
    file = root / f"{pointer}.json"
    if not file.is_file():
        return None
    return _read_pointer(file)


def _read_pointer(file: Path) -> str:
    try:
        target = json.loads(file.read_text())["dir"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"checkpoint pointer {str(file)!r} is corrupt (expected {{\"dir\": ...}}); point it at a "
                         f"complete checkpoint folder beside it or pass that folder") from None
    if not isinstance(target, str) or "/" in target:
        raise ValueError(f"checkpoint pointer {str(file)!r} names {target!r}, not a checkpoint folder beside it")
    return target


def _prune(root: Path) -> None:
    """Remove checkpoint folders no pointer names, and temporary folders of dead writers."""
    keep = {_pointer_target(root, p) for p in POINTERS}
    for child in root.iterdir():
        if child.is_dir() and child.name not in keep and (child.name.startswith("step-")
                                                          or child.name.startswith(".tmp-step-")):
            shutil.rmtree(child, ignore_errors=True)


def resolve_checkpoint(path: str | Path, pointer: str = "last") -> Path:
    """The checkpoint folder meant by a run folder, a checkpoints folder, a pointer file or the folder itself."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return path.parent / _read_pointer(path)
    if path.is_dir() and (path / WEIGHTS).is_file():
        return path
    for root in (path, checkpoint_dir(path)):
        target = _pointer_target(root, pointer) if root.is_dir() else None
        if target is not None:
            return root / target
    raise ValueError(
        f"no checkpoint at {str(path)!r}; expected a run folder with checkpoints/{pointer}.json, "
        f"a pointer file (last.json, best.json) or a folder holding {WEIGHTS} and {STATE}"
    )


def has_checkpoint(out_dir: str | Path) -> bool:
    """Whether `out_dir` already holds a `last` checkpoint."""
    return (checkpoint_dir(out_dir) / "last.json").is_file()


def load_checkpoint(path: str | Path, pointer: str = "last") -> Checkpoint:
    """Read a checkpoint (see `resolve_checkpoint` for what `path` may be) onto the CPU."""
    folder = resolve_checkpoint(path, pointer)
    for file in (WEIGHTS, STATE):
        if not (folder / file).is_file():
            raise ValueError(f"checkpoint {str(folder)!r} lacks {file}; it is incomplete or was moved")
    try:
        model = load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise ValueError(f"checkpoint weights {str(folder / WEIGHTS)!r} cannot be read ({error}); the file is "
                         "truncated or not safetensors") from None
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ValueError(f"checkpoint state {str(folder / STATE)!r} cannot be read ({type(error).__name__}: "
                         f"{str(error)[:200]}); the file is truncated or not a gcnet state file") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint {folder} has format {found}, expected {FORMAT_VERSION}")
    return Checkpoint(folder, model, state)

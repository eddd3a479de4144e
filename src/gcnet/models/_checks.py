"""Checks of the models alone (stages, block indices, input hints); shared checks live in `gcnet._checks`."""

from __future__ import annotations

from collections.abc import Sequence

# Advice on a wrong input rank, keyed by the rank received: a clip given to an image model and back.
IMAGE_INPUT_HINTS: dict[int, str] = {5: "for clips use a video model (c2d_*/i3d_*/slowonly_*)"}
CLIP_INPUT_HINTS: dict[int, str] = {4: "for single images use a 2D model, or add a time dim of size T"}


def check_stages(stages: object, num_stages: int) -> tuple[bool, ...]:
    """Return `stages` as a tuple of `num_stages` bools (one per stage), else raise."""
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise TypeError(f"stages must be a sequence of {num_stages} bools, got {stages!r}")
    if len(stages) != num_stages or not all(isinstance(s, bool) for s in stages):
        raise ValueError(
            f"stages must hold {num_stages} bools (one per stage, e.g. "
            f"{(False,) + (True,) * (num_stages - 1)}), got {tuple(stages)!r}"
        )
    return tuple(stages)


def check_indices(name: str, indices: object, depths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Return per-stage block indices as tuples; each index must name a block of its stage."""
    if indices is None:
        return tuple(() for _ in depths)
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or len(indices) != len(depths):
        raise ValueError(
            f"{name} must hold {len(depths)} sequences of block indices (one per stage), got {indices!r}"
        )
    result = []
    for stage, (chosen, depth) in enumerate(zip(indices, depths)):
        if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Sequence):
            raise TypeError(f"{name}[{stage}] must be a sequence of ints, got {chosen!r}")
        for index in chosen:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < depth:
                raise ValueError(
                    f"{name}[{stage}] holds {index!r}; stage {stage} has {depth} blocks, "
                    f"expected indices in 0..{depth - 1}"
                )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"{name}[{stage}] repeats an index: {tuple(chosen)}")
        result.append(tuple(sorted(chosen)))
    return tuple(result)

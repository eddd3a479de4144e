"""Argument and input checks shared by the models: clear errors at build time or at the model's entrance."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

_LAYOUTS = {4: "(B, C, H, W) images", 5: "(B, C, T, H, W) clips"}


def check_input(model: str, x: object, in_channels: int, rank: int) -> None:
    """Raise if `x` is not a non-empty float tensor of `rank` dims with `in_channels` channels."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{model} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        hint = ""
        if rank == 5 and x.dim() == 4:
            hint = "; for single images use a 2D model, or add a time dim of size T"
        elif rank == 4 and x.dim() == 5:
            hint = "; for clips use a video model (c2d_*/i3d_*)"
        raise ValueError(
            f"{model} expects {_LAYOUTS[rank]} with C={in_channels}, got shape {tuple(x.shape)}{hint}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{model} expects {in_channels} input channels (dim 1), "
            f"got {x.shape[1]} in shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{model} expects a floating-point input, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{model} expects a non-empty input, got shape {tuple(x.shape)}")


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return `value` if it is an int >= `minimum`, else raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


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

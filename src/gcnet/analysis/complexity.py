"""Parameters and FLOPs of any model at any input size, per stage, counted by torch (not by hand).

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-add
of matmuls, convolutions and attention. The papers' "FLOPs" (ResNet-50: 4.1 G) are multiply-adds,
so `macs = flops / 2` is the number to compare with them. Element-wise ops (BN, ReLU, softmax,
the add of a GC block) are not counted, as in the papers.

Counting runs the model on the meta device when it is built by name (no memory, no compute), so
a 224 x 224 ResNet-152 or a 32-frame I3D costs milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(
    query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any, **kwargs: Any
) -> int:
    """FLOPs of CPU attention, which the counter does not know (it counts the CUDA kernels)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
STEM = ("conv1", "bn1")
HEAD = ("fc",)


@dataclasses.dataclass(frozen=True)
class StageComplexity:
    """One row of the table: a stage (or the stem / head) with its blocks, parameters and FLOPs."""

    name: str
    residual_blocks: int
    context_blocks: int
    nonlocal_blocks: int
    params: int
    flops: int

    @property
    def macs(self) -> int:
        """Multiply-adds: the papers' "FLOPs"."""
        return self.flops // 2


@dataclasses.dataclass(frozen=True)
class Complexity:
    """Parameters and FLOPs of a model at one input shape, in total and per stage."""

    model: str
    input_shape: tuple[int, ...]
    params: int
    flops: int
    stages: tuple[StageComplexity, ...]
    notes: tuple[str, ...] = ()

    @property
    def macs(self) -> int:
        """Multiply-adds: the papers' "FLOPs"."""
        return self.flops // 2

    def table(self) -> str:
        """A plain-text table: per stage blocks, parameters (M) and multiply-adds (G)."""
        header = f"{'stage':<8} {'res':>4} {'ctx':>4} {'nl':>4} {'params (M)':>11} {'GMACs':>9} {'GFLOPs':>9}"
        lines = [f"{self.model}  input {tuple(self.input_shape)}", *self.notes, header, "-" * len(header)]
        for s in self.stages:
            lines.append(
                f"{s.name:<8} {s.residual_blocks:>4} {s.context_blocks:>4} {s.nonlocal_blocks:>4} "
                f"{s.params / 1e6:>11.3f} {s.macs / 1e9:>9.3f} {s.flops / 1e9:>9.3f}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<8} {sum(s.residual_blocks for s in self.stages):>4} "
            f"{sum(s.context_blocks for s in self.stages):>4} "
            f"{sum(s.nonlocal_blocks for s in self.stages):>4} "
            f"{self.params / 1e6:>11.3f} {self.macs / 1e9:>9.3f} {self.flops / 1e9:>9.3f}"
        )
        lines.append(
            "res: residual blocks, ctx: context blocks inside them, nl: blocks between them; "
            "GMACs = multiply-adds (the papers' FLOPs)"
        )
        return "\n".join(lines)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _input(model: nn.Module, input: Tensor | Sequence[int]) -> Tensor:
    if isinstance(input, Tensor):
        return input
    shape = tuple(input)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input shape must be positive ints such as (1, 3, 224, 224), got {input!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    return torch.zeros(shape, device=device, dtype=dtype)


def flop_counts(model: nn.Module, input: Tensor | Sequence[int]) -> dict[str, int]:
    """FLOPs per module name (dotted, "" for the model itself) of one forward pass without grad."""
    x = _input(model, input)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    was_training = model.training
    model.eval()
    try:
        with counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    root = type(model).__name__
    counts = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        key = "" if name == root else name[len(root) + 1 :] if name.startswith(root + ".") else name
        counts[key] = int(sum(ops.values()))
    counts[""] = int(counter.get_total_flops())
    return counts


def count_flops(model: nn.Module, input: Tensor | Sequence[int]) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on `input` (a tensor or a shape)."""
    return flop_counts(model, input)[""]


def _stage_rows(model: nn.Module, counts: Mapping[str, int]) -> list[StageComplexity]:
    rows = []
    children = dict(model.named_children())
    stem = [n for n in children if n in STEM]
    layers = [n for n in children if n.startswith("layer")]
    head = [n for n in children if n in HEAD]
    known = set(stem) | set(layers) | set(head)
    other = [n for n in children if n not in known]

    def group(name: str, names: Sequence[str]) -> StageComplexity:
        params = sum(count_parameters(children[n]) for n in names)
        flops = sum(counts.get(n, 0) for n in names)
        residual = context = nonlocal_count = 0
        for n in names:
            module = children[n]
            if n.startswith("layer"):
                residual = len(module) if hasattr(module, "__len__") else 0
                context = sum(1 for b in module if getattr(b, "context", None) is not None)
                nonlocal_count = len(getattr(module, "nonlocal_blocks", {}))
        return StageComplexity(name, residual, context, nonlocal_count, params, flops)

    if stem:
        rows.append(group("stem", stem))
    rows.extend(group(n, [n]) for n in layers)
    if head:
        rows.append(group("head", head))
    if other and (any(count_parameters(children[n]) for n in other) or any(counts.get(n, 0) for n in other)):
        rows.append(group("other", other))
    return rows


def model_complexity(model: nn.Module, input: Tensor | Sequence[int], name: str | None = None) -> Complexity:
    """Parameters and FLOPs of `model` on `input` (a tensor or a shape with batch), per stage."""
    x = _input(model, input)
    counts = flop_counts(model, x)
    rows = _stage_rows(model, counts)
    return Complexity(
        name or type(model).__name__, tuple(x.shape), count_parameters(model), counts[""], tuple(rows)
    )


def default_input_shape(name: str, **options: Any) -> tuple[int, ...]:
    """The usual input of a registered model: 32 x 32 for CIFAR, 8 (or 32) x 224 x 224 clips, else 224."""
    if name.startswith("cifar_"):
        return (1, 3, 32, 32)
    if name.startswith(("c2d_", "i3d_", "slowonly_")):
        return (1, 3, 32 if options.get("layout") in ("paper", "mmaction2") else 8, 224, 224)
    return (1, 3, 224, 224)


def complexity_of(name: str, input_shape: Sequence[int] | None = None, **options: Any) -> Complexity:
    """Complexity of the registered model `name`, built on the meta device (no memory, no compute)."""
    from gcnet.models import create_model, get_model_entry
    from gcnet.models.video_resnet import VideoResNet

    shape = tuple(input_shape) if input_shape is not None else default_input_shape(name, **options)
    with torch.device("meta"):
        model = create_model(name, **options)
    notes = [get_model_entry(name).description]
    if isinstance(model, VideoResNet):
        notes.append(model.describe(shape[2]))
    return dataclasses.replace(model_complexity(model, shape, name), notes=tuple(notes))

"""Put context blocks into a ResNet the user already has (torchvision, timm or gcnet), in place.

Fine-tuning a pretrained net with new blocks should start from the pretrained function: every
inserted block must be the identity at initialisation (the GC/SNL add transform ends in zeros, the
NL block's last BatchNorm is zero), so outputs are unchanged at insertion. Blocks that are not
(SE's sigmoid scale halves its input at init) are refused rather than silently changing the net.

    torchvision: every residual block is replaced by a gcnet block, built by its own __init__, that
                 then takes the same conv/BN modules (torchvision's attribute names), so keys stay
                 `layerN.i.conv1...` plus `.context.*`.
    timm:        the block goes in timm's own slots: `se` (before_add), `aa` (after_3x3), or after
                 the final activation (after_add, `act3`/`act2` become Sequential(act, block)).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gcnet._checks import check_choice
from gcnet.models._checks import check_stages
from gcnet.models._options import ContextSpec, context_factory
from gcnet.models.resnet import POSITIONS, BasicBlock, Bottleneck, Position

_TORCHVISION_CHILDREN = {
    "BasicBlock": {"conv1", "bn1", "relu", "conv2", "bn2", "downsample"},
    "Bottleneck": {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"},
}


def _kind(block: nn.Module) -> tuple[str, str]:
    """(library, block class name) of a residual block, or raise."""
    module = type(block).__module__
    name = type(block).__name__
    if isinstance(block, (BasicBlock, Bottleneck)):
        return "gcnet", name
    if module.startswith("torchvision.models") and name in _TORCHVISION_CHILDREN:
        return "torchvision", name
    if module.startswith("timm.models") and name in ("BasicBlock", "Bottleneck"):
        return "timm", name
    raise TypeError(
        f"cannot insert into {module}.{name}; expected residual blocks of torchvision, timm or gcnet ResNets"
    )


def _channels(block: nn.Module, name: str, position: str) -> int:
    """Channels at `position`: the 3x3's output for after_3x3, the block's output otherwise."""
    if position == "after_3x3":
        return (block.bn2 if name == "Bottleneck" else block.bn1).num_features
    return (block.bn3 if name == "Bottleneck" else block.bn2).num_features


def _check_identity(module: nn.Module, channels: int, what: str) -> None:
    """Raise unless `module` returns its input at initialisation (checked on a small random input)."""
    was_training = module.training
    module.eval()
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    probe = torch.randn(2, channels, 3, 3, dtype=dtype, device=device)
    with torch.no_grad():
        changed = not torch.allclose(module(probe), probe)
    module.train(was_training)
    if changed:
        raise ValueError(
            f"{what} changes its input at initialisation, so inserting it would change the pretrained "
            "outputs; insert an add-fusion block ('gc', 'snl', 'nl') instead"
        )


def _adopt_torchvision(block: nn.Module, name: str, context: nn.Module | None, position: str) -> nn.Module:
    """A gcnet block that holds `block`'s own modules (no copies) and the new context block.

    The gcnet block comes from its own __init__ (so it has every attribute a gcnet block has), on
    the meta device: its convs and norms cost nothing, as each is then replaced by `block`'s. A
    tensor that `block` cannot supply raises rather than staying behind uninitialised.
    """
    children = dict(block.named_children())
    if not set(children) <= _TORCHVISION_CHILDREN[name]:
        raise TypeError(
            f"torchvision {name} has unexpected modules {sorted(set(children) - _TORCHVISION_CHILDREN[name])}"
        )
    cls = Bottleneck if name == "Bottleneck" else BasicBlock
    planes = (block.conv3 if name == "Bottleneck" else block.conv2).out_channels // cls.expansion
    groups = block.conv2.groups if name == "Bottleneck" else 1
    width_per_group = block.conv2.out_channels // groups * 64 // planes if name == "Bottleneck" else 64
    with torch.device("meta"):
        new = cls(
            block.conv1.in_channels,
            planes,
            block.stride,
            block.downsample,
            groups=groups,
            width_per_group=width_per_group,
            context=None if context is None else (lambda channels: context),
            position=position,
        )
    for child, module in children.items():
        setattr(new, child, module)
    given = [block] if context is None else [block, context]
    supplied = {id(t) for m in given for t in itertools.chain(m.parameters(), m.buffers())}
    tensors = itertools.chain(new.named_parameters(), new.named_buffers())
    left = [n for n, t in tensors if id(t) not in supplied]
    if left:
        raise TypeError(f"torchvision {name} has no modules for gcnet's {left}")
    return new.train(block.training)


def _insert_timm(block: nn.Module, name: str, context: nn.Module, position: str) -> None:
    if position == "before_add":
        if block.se is not None:
            raise ValueError(f"timm {name} already holds {type(block.se).__name__} in its `se` slot")
        block.se = context
    elif position == "after_3x3":
        if not isinstance(block.aa, nn.Identity):
            raise ValueError(f"timm {name} holds anti-aliasing {type(block.aa).__name__} in its `aa` slot")
        block.aa = context
    else:
        act = "act3" if name == "Bottleneck" else "act2"
        setattr(block, act, nn.Sequential(getattr(block, act), context))


def insert_context_blocks(
    model: nn.Module,
    context: ContextSpec = "gc",
    *,
    reduction: int | None = None,
    context_options: Mapping[str, Any] | None = None,
    stages: Sequence[bool] = (False, True, True, True),
    position: Position = "before_add",
) -> nn.Module:
    """Insert a context block into every residual block of the chosen stages of `model`, in place.

    Works on torchvision and timm ResNets/ResNeXts and on gcnet ResNets without blocks there. New
    blocks take the dtype, device and train/eval mode of their residual block. Outputs are
    unchanged at insertion; a block that is not the identity at init raises ValueError before
    anything changes. Returns `model`.

    Args:
        model: a ResNet with `layer1..layer4` of residual blocks.
        context: "gc" (default), "snl", "nl", or a constructor taking channels.
        reduction, context_options: block options, as for `create_model`.
        stages: which of layer1..layer4 get blocks (default c3-c5).
        position: "before_add" (default), "after_3x3" or "after_add".
    """
    check_choice("position", position, POSITIONS)
    stages = check_stages(stages, 4)
    layers = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if any(layer is None for layer in layers):
        raise TypeError(f"expected a ResNet with layer1..layer4, got {type(model).__name__}")
    factory = context_factory(context, reduction, context_options, dims=2)
    if factory is None:
        raise ValueError("context=None inserts nothing; pass 'gc', 'snl', 'nl' or a constructor")
    plan = []  # (layer, index, block, library, class name, new context block), built before any change
    for layer, chosen in zip(layers, stages):
        for index, block in enumerate(layer):
            library, name = _kind(block)
            if not chosen:  # torchvision blocks still become gcnet blocks (without context), for one kind
                if library == "torchvision":
                    plan.append((layer, index, block, library, name, None))
                continue
            if library == "gcnet" and block.context is not None:
                raise ValueError(f"{type(model).__name__} already has a context block in {name} {index}")
            channels = _channels(block, name, position)
            new = factory(channels)
            param = next(block.parameters())
            new.to(device=param.device, dtype=param.dtype)
            _check_identity(new, channels, f"block {type(new).__name__}")
            new.train(block.training)
            plan.append((layer, index, block, library, name, new))
    for layer, index, block, library, name, new in plan:
        if library == "torchvision":
            layer[index] = _adopt_torchvision(block, name, new, position)
        elif library == "timm":
            _insert_timm(block, name, new, position)
        else:
            block.position = position
            block.context = new
    return model

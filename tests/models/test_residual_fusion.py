"""A residual block's end, ReLU(context(out) + identity), as one pass: the same numbers as the three ops."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from gcnet.blocks import (
    GlobalContext,
    SimplifiedNonLocal,
    SqueezeExcite,
    _fused,
    composite_autograd,
    fused_block_ends,
    native_kernels,
    native_kernels_available,
)
from gcnet.models import BasicBlock, Bottleneck, create_model
from tests.models.helpers import randomize_

needs_kernels = pytest.mark.skipif(not native_kernels_available(), reason="gcnet._C is not built")

CONTEXTS = {
    "none": None,
    "gc": lambda c: GlobalContext(c, reduction=4),
    "se": lambda c: SqueezeExcite(c, 4),
    "snl": SimplifiedNonLocal,
    "gc-both": lambda c: GlobalContext(c, reduction=4, fusion="both"),
}


def make_block(kind: str, context: str, dims: int = 2) -> nn.Module:
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)) if dims == 2 else None
    if kind == "basic":
        block = BasicBlock(8, 16, downsample=downsample, context=CONTEXTS[context])
    else:
        channels = 8 if dims == 2 else 16
        block = Bottleneck(channels, 4, downsample=downsample, context=CONTEXTS[context], dims=dims)
    return randomize_(block).double()


def three_ops(block: nn.Module, x: Tensor) -> Tensor:
    """The block as written before the fusion: context(out), then + identity, then ReLU."""
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    if block.context is not None:
        out = block.context(out)
    identity = x if block.downsample is None else block.downsample(x)
    return torch.relu(out + identity)


def outputs_and_grads(forward, block: nn.Module, x: Tensor) -> list[Tensor]:
    x = x.detach().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    out = forward(block, x)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return [out.detach(), x.grad, *(p.grad for p in block.parameters())]


@pytest.fixture
def residual_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the kernel calls that end a residual block (scale_shift with a residual)."""
    calls: Counter[str] = Counter()
    kernels = _fused._native

    class Counting:
        def __getattr__(self, name: str):
            def counted(*args):
                calls[name + ("+residual" if name == "scale_shift" and args[3] is not None else "")] += 1
                return getattr(kernels, name)(*args)

            return counted

    if kernels is not None:
        monkeypatch.setattr(_fused, "_native", Counting())
    return calls


@needs_kernels
@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("kind, dims", [("basic", 2), ("bottleneck", 2), ("bottleneck", 3)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_fused_end_matches_the_three_ops(residual_calls: Counter[str], kind: str, dims: int, context: str,
                                         channels_last: bool) -> None:
    block = make_block(kind, context, dims)
    shape = (2, block.conv1.in_channels, 6, 5) if dims == 2 else (2, 16, 3, 4, 5)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        layout = torch.channels_last if dims == 2 else torch.channels_last_3d
        block, x = block.to(memory_format=layout), x.contiguous(memory_format=layout)
    with composite_autograd(), native_kernels(False):
        expected = outputs_and_grads(three_ops, block, x)
    got = outputs_and_grads(lambda b, t: b(t), block, x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # float64 Conv3d returns NCDHW memory for channels_last_3d input: the layouts differ, the ops run.
    kernel_calls = 0 if dims == 3 and channels_last else 1
    assert residual_calls["scale_shift+residual"] == kernel_calls
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), three_ops(block, x), rtol=1e-10, atol=1e-10)
    assert residual_calls["scale_shift+residual"] == 2 * kernel_calls


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "pytorch"])
@pytest.mark.parametrize("context", ["none", "gc", "se", "gc-both"])
def test_gradcheck_of_the_fused_end(context: str, kernels: bool) -> None:
    if kernels and not native_kernels_available():
        pytest.skip("gcnet._C is not built")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 2, 3, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 8, 2, 3, dtype=torch.float64, requires_grad=True)
    if context == "none":  # a plain block: differentiable twice, as the ops it replaces
        with native_kernels(kernels):
            assert torch.autograd.gradcheck(_fused.residual_relu, (x, residual), eps=1e-6, atol=1e-7)
            assert torch.autograd.gradgradcheck(_fused.residual_relu, (x, residual), eps=1e-6, atol=1e-7)
        return
    block = randomize_(CONTEXTS[context](8)).double()
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in block.parameters()]

    wrapper = ForwardResidual(block)

    def fn(x: Tensor, residual: Tensor, *params: Tensor) -> Tensor:
        return functional_call(wrapper, {f"block.{n}": p for n, p in zip(names, params)}, (x, residual))

    with native_kernels(kernels):
        assert torch.autograd.gradcheck(fn, (x, residual, *params), eps=1e-6, atol=1e-7)


class ForwardResidual(nn.Module):
    """Calls the block's forward_residual, so that functional_call can swap its parameters."""

    def __init__(self, block: GlobalContext) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.block.forward_residual(x, residual)


def test_hooks_on_the_context_block_see_its_own_output() -> None:
    block = make_block("bottleneck", "gc")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    seen: list[Tensor] = []
    handle = block.context.register_forward_hook(lambda module, args, out: seen.append(out - args[0]))
    try:
        with torch.no_grad():
            hooked = block(x)
    finally:
        handle.remove()
    with torch.no_grad():
        fused = block(x)
    torch.testing.assert_close(hooked, fused, rtol=1e-12, atol=1e-12)
    (added,) = seen  # the add term, the same at every position: z - x of the block alone
    torch.testing.assert_close(added, added[..., :1, :1].expand_as(added), rtol=0, atol=1e-12)


class Doubled(GlobalContext):
    """A user's subclass with its own forward: the fused end must not bypass it."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


def test_subclasses_with_their_own_forward_keep_it(residual_calls: Counter[str]) -> None:
    block = randomize_(Bottleneck(8, 2, context=lambda c: Doubled(c, reduction=4))).double().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), three_ops(block, x), rtol=1e-12, atol=1e-12)
    assert residual_calls["scale_shift+residual"] == int(native_kernels_available())


def test_a_residual_of_another_shape_is_refused() -> None:
    block = GlobalContext(8, reduction=4)
    with pytest.raises(ValueError, match=r"residual of the input's shape \(2, 8, 4, 4\), got \(2, 8, 4, 2\)"):
        block.forward_residual(torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 2))


def test_unfused_ends_compute_the_same(residual_calls: Counter[str]) -> None:
    block = make_block("bottleneck", "gc").eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad(), fused_block_ends(False):
        unfused = block(x)
    # the GC block alone (pooling, transforms), then the add and the ReLU
    assert residual_calls == {"attention_pool": 1, "transform_forward": 1}
    with torch.no_grad():
        torch.testing.assert_close(block(x), unfused, rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("context", [None, "gc", "se"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_float32_training_is_bit_identical_to_the_three_ops(context: str | None, channels_last: bool) -> None:
    """The CIFAR study mixes runs from before and after the fusion: a step must not change a bit."""
    options = {} if context is None else {"context": context, "reduction": 4}
    model = randomize_(create_model("cifar_resnet20", num_classes=10, **options))
    x = torch.randn(4, 3, 32, 32)
    if channels_last:
        layout = torch.channels_last
        model, x = model.to(memory_format=layout), x.contiguous(memory_format=layout)
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with fused_block_ends(fused):
            out = model(x)
            out.square().sum().backward()
        results.append([out.detach(), *(p.grad for p in model.parameters())])
    for a, b in zip(*results):
        assert torch.equal(a, b)

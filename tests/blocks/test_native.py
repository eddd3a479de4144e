"""The CPU kernels (gcnet._C) against the paper's formula and the PyTorch path they replace."""

import itertools
import os
import sys
from collections import Counter

import pytest
import torch

from gcnet.blocks import (
    GlobalContext,
    SimplifiedNonLocal,
    SqueezeExcite,
    _fused,
    composite_autograd,
    native_kernels,
    native_kernels_available,
)
from gcnet.blocks._fused import ContextTransforms
from gcnet.blocks.global_context import ContextTransform
from tests.blocks.reference import global_context_reference, randomize_
from tests.blocks.shapes import gradcheck_block

needs_kernels = pytest.mark.skipif(not native_kernels_available(), reason="gcnet._C is not built")

# (B, C, *positions); test_every_block_size_computes_the_same walks samples in several blocks.
SHAPES = [(2, 8, 6), (3, 8, 5, 3), (2, 8, 2, 3, 4), (2, 64, 50, 90)]
SMALL_SHAPES = SHAPES[:3]


class Spy:
    """Stands in for the gcnet._C module and counts the kernels called through it."""

    def __init__(self, module) -> None:
        self.module = module
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str):
        kernel = getattr(self.module, name)

        def counted(*args):
            self.calls[name] += 1
            return kernel(*args)

        return counted


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy(_fused._native)
    monkeypatch.setattr(_fused, "_native", spy)
    return spy


def laid_out(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x, or the same values with channels contiguous (channels_last for any number of position dims)."""
    if not channels_last:
        return x
    rank = x.dim()
    y = x.permute(0, *range(2, rank), 1).contiguous().permute(0, rank - 1, *range(1, rank - 1))
    positions = y.flatten(2)
    assert positions.transpose(1, 2).is_contiguous() and not positions.is_contiguous()
    return y


def test_kernels_are_built_where_the_install_builds_them() -> None:
    if os.environ.get("GCNET_NATIVE") == "0" or not sys.platform.startswith("linux"):
        pytest.skip("this install builds no CPU kernels")
    assert native_kernels_available(), (
        "gcnet._C is missing: install torch first, then `pip install --no-build-isolation -e .` (make test does)"
    )


def outputs_and_grads(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    out = block(x)
    out.backward(grad)
    return [out.detach(), x.grad, *(p.grad for p in block.parameters())]


# (pooling, fusion) -> the kernels one training step calls.
ONE_TRANSFORM = {"transform_forward": 1, "transform_backward": 1}
CONFIGS = {
    ("attention", "add"): {"attention_pool": 1, "attention_pool_backward": 1, **ONE_TRANSFORM},
    ("attention", "scale"): {
        "attention_pool": 1, "attention_pool_backward": 1, "fusion_sums": 1, **ONE_TRANSFORM,
    },
    ("attention", "both"): {
        "attention_pool": 1, "scale_shift": 1, "attention_pool_backward": 1, "fusion_sums": 1,
        "transform_forward": 2, "transform_backward": 2,
    },
    ("average", "scale"): {"fusion_sums": 1, "scale_shift": 1, **ONE_TRANSFORM},
    ("average", "add"): ONE_TRANSFORM,
}
# In channels_last, sums over positions (average pooling, the add's gradient) take a kernel too.
CHANNELS_LAST_SUMS = {("attention", "add"): 1, ("average", "scale"): 1, ("average", "add"): 2}


def expected_calls(config: tuple[str, str], channels_last: bool) -> dict[str, int]:
    sums = CHANNELS_LAST_SUMS.get(config, 0) if channels_last else 0
    return {**CONFIGS[config], **({"position_sums": sums} if sums else {})}


def make_block(channels: int, pooling: str, fusion: str) -> GlobalContext:
    return randomize_(GlobalContext(channels, reduction=4, pooling=pooling, fusion=fusion)).double()


@needs_kernels
@pytest.mark.parametrize("config", list(CONFIGS), ids="-".join)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_the_composite_path(spy: Spy, shape: tuple, channels_last: bool,
                                                       config: tuple[str, str]) -> None:
    block = make_block(shape[1], *config)
    x = laid_out(torch.randn(shape, dtype=torch.float64) * 2, channels_last)
    grad = laid_out(torch.randn(shape, dtype=torch.float64), channels_last)
    with composite_autograd():
        expected = outputs_and_grads(block, x, grad)
    with native_kernels(False):
        without_kernels = outputs_and_grads(block, x, grad)
    assert not spy.calls
    got = outputs_and_grads(block, x, grad)
    assert spy.calls == expected_calls(config, channels_last)
    for a, b, c in zip(got, without_kernels, expected):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-10)
    assert got[1].stride() == x.stride()  # grad_x keeps x's memory layout


@needs_kernels
@pytest.mark.parametrize("gate", [False, True], ids=["add", "gate"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_every_block_size_computes_the_same(channels_last: bool, gate: bool) -> None:
    B, C, N = 2, 9, 37  # C not a multiple of the kernels' 4 rows, N not of any block
    x = laid_out(torch.randn(B, C, N, dtype=torch.float64), channels_last)
    grad_out = laid_out(torch.randn(B, C, N, dtype=torch.float64), channels_last)
    weight, bias = torch.randn(C, dtype=torch.float64), torch.randn(1, dtype=torch.float64)
    grad_context = torch.randn(B, C, dtype=torch.float64)
    scale = torch.rand(B, C, dtype=torch.float64) if gate else None
    results = []
    for block in (1, 5, 7, 16, N, 1000):
        alpha, context = _fused._native.attention_pool(x, weight, bias, block)
        grads = _fused._native.attention_pool_backward(
            x, grad_out, weight, alpha, context, grad_context, scale, block)
        results.append([alpha, context, *grads])
    logits = torch.einsum("c,bcn->bn", weight, x) + bias
    torch.testing.assert_close(results[0][0], logits.softmax(-1).unsqueeze(1), rtol=1e-12, atol=1e-12)
    for result in results[1:]:
        for a, b in zip(result, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("C, N", [(8, 16), (13, 7), (19, 49), (67, 9), (3, 2), (13, 14), (9, 12), (11, 23)])
def test_kernels_match_autograd_for_any_row_and_lane_remainder(C: int, N: int, channels_last: bool,
                                                                dtype: torch.dtype) -> None:
    """Channel rows go in groups of one vector's lanes (8 floats, 4 doubles): every remainder counts."""
    B = 2
    x = laid_out(torch.randn(B, C, N, dtype=torch.float64), channels_last)
    grad_out = laid_out(torch.randn(B, C, N, dtype=torch.float64), channels_last)
    weight, bias = torch.randn(C, dtype=torch.float64), torch.randn(1, dtype=torch.float64)
    grad_context, gate = torch.randn(B, C, dtype=torch.float64), torch.rand(B, C, dtype=torch.float64)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    alpha = (torch.einsum("c,bcn->bn", leaves[1], leaves[0]) + leaves[2]).softmax(-1)
    context = torch.einsum("bcn,bn->bc", leaves[0], alpha)
    loss = (context * grad_context).sum() + (leaves[0] * gate.unsqueeze(-1) * grad_out).sum()
    expected = [alpha.unsqueeze(1), context, *torch.autograd.grad(loss, leaves)]
    cast = [t.to(dtype) for t in (x, grad_out, weight, bias, grad_context, gate)]
    x_, grad_out_, weight_, bias_, grad_context_, gate_ = cast
    got_alpha, got_context = _fused._native.attention_pool(x_, weight_, bias_, N)
    got = [got_alpha, got_context, *_fused._native.attention_pool_backward(
        x_, grad_out_, weight_, got_alpha, got_context, grad_context_, gate_, N)]
    got[3] = got[3].reshape(C)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance)
    sums, products = _fused._native.fusion_sums(x_, grad_out_)
    torch.testing.assert_close(sums.double(), grad_out.sum(-1), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(products.double(), (grad_out * x).sum(-1), rtol=tolerance, atol=tolerance)
    fused = _fused._native.scale_shift(x_, gate_, grad_context_)
    assert fused.stride() == x_.stride()
    expected = x * gate.unsqueeze(-1) + grad_context.unsqueeze(-1)
    torch.testing.assert_close(fused.double(), expected, rtol=tolerance, atol=tolerance)
    fused = _fused._native.scale_shift(x_, gate_, grad_context_, grad_out_)  # a residual block's end
    assert fused.stride() == x_.stride()
    torch.testing.assert_close(fused.double(), (expected + grad_out).relu(), rtol=tolerance, atol=tolerance)


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_fusion_sums_are_the_gradients_of_add_and_gate(channels_last: bool) -> None:
    x = laid_out(torch.randn(3, 10, 7, 5, dtype=torch.float64), channels_last).flatten(2)
    grad_out = laid_out(torch.randn(3, 10, 7, 5, dtype=torch.float64), channels_last).flatten(2)
    sums, products = _fused._native.fusion_sums(x, grad_out)
    torch.testing.assert_close(sums, grad_out.sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(products, (grad_out * x).sum(-1), rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("C, H, W", [(10, 7, 5), (16, 2, 2), (3, 1, 2), (8, 9, 3)])
def test_position_sums_match_torch(channels_last: bool, dtype: torch.dtype, C: int, H: int, W: int) -> None:
    x = laid_out(torch.randn(3, C, H, W, dtype=torch.float64), channels_last).to(dtype).flatten(2)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(_fused._native.position_sums(x), x.sum(-1), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(_fused.position_sums(x, mean=True), x.mean(-1), rtol=tolerance, atol=tolerance)
    with pytest.raises(RuntimeError, match="expected x of shape"):
        _fused._native.position_sums(x[0])


def test_blocks_follow_the_cache_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "_cache_bytes", lambda: (2**20, 32 * 2**20))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        # 7 even blocks of half of L2 at 56x56 (rows of 1792 bytes); rows would be 784 bytes at 28x28
        # (4 blocks) and 484 in the video's 13: whole samples there (two threads' fit in half of L3).
        assert _fused.positions_per_block(torch.empty(32, 256, 3136)) == 448
        assert _fused.positions_per_block(torch.empty(32, 512, 784)) == 784
        assert _fused.positions_per_block(torch.empty(4, 1024, 8 * 14 * 14)) == 1568
        video = torch.empty(4, 1024, 8 * 56 * 56)  # 98 MiB a sample: blocks of 8 MiB of whole rows
        assert _fused.positions_per_block(video) == 8 * 2**20 // (1024 * 4)  # 4 KiB rows
        channels_last = torch.empty(32, 3136, 256).transpose(1, 2)  # contiguous blocks in half of L2
        assert _fused.positions_per_block(channels_last) == 2**19 // (256 * 4)
        assert _fused.positions_per_block(torch.empty(2, 4096, 4)) == 4  # never more than N
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_the_pooling_kernels_take_blocks_of_half_of_l2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "_cache_bytes", lambda: (2**15, 32 * 2**20))  # L2 32 KiB
    blocks: dict[str, int] = {}

    class Recorder:
        def __getattr__(self, name: str):
            kernel = getattr(native, name)

            def record(*args):
                if name.startswith("attention_pool"):
                    blocks[name] = args[-1]
                return kernel(*args)

            return record

    native = _fused._native
    monkeypatch.setattr(_fused, "_native", Recorder())
    block = make_block(16, "attention", "add")
    x = torch.randn(2, 16, 32, 32, dtype=torch.float64)  # 128 bytes a position
    grad = torch.randn(x.shape, dtype=torch.float64)
    with composite_autograd():
        expected = outputs_and_grads(block, x, grad)
    got = outputs_and_grads(block, x, grad)
    # 16 KiB of a sample at a time in both directions (128 positions, rows of 1 KiB).
    assert blocks == {"attention_pool": 128, "attention_pool_backward": 128}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_inference_matches_the_paper_formula(spy: Spy, shape: tuple, channels_last: bool) -> None:
    block = randomize_(GlobalContext(shape[1], reduction=4)).double().eval()
    x = laid_out(torch.randn(shape, dtype=torch.float64), channels_last)
    with torch.no_grad():
        out = block(x)
    assert spy.calls == {"attention_pool": 1, "transform_forward": 1}
    if x.numel() < 10_000:  # the reference loops over positions in Python
        expected, _ = global_context_reference(block, x, "attention", "add", bottleneck=True, norm=True, relu=True)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    with native_kernels(False), torch.no_grad():
        torch.testing.assert_close(out, block(x), rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_average_pooling_sums_through_the_kernel_in_channels_last(spy: Spy, channels_last: bool) -> None:
    block = randomize_(SqueezeExcite(16, 4)).double().eval()
    x = laid_out(torch.randn(4, 16, 5, 6, dtype=torch.float64), channels_last)
    with torch.no_grad():
        out = block(x)
    assert spy.calls["position_sums"] == int(channels_last)
    with native_kernels(False), torch.no_grad():
        torch.testing.assert_close(out, block(x), rtol=1e-12, atol=1e-12)
    spy.calls.clear()
    x.requires_grad_(True)
    block.context(x).sum().backward()  # a gradient wanted: torch's mean, which builds the graph
    assert not spy.calls["position_sums"]
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 30))


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "pytorch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_on_each_path(shape: tuple, channels_last: bool, kernels: bool) -> None:
    if kernels and not native_kernels_available():
        pytest.skip("gcnet._C is not built")
    x = laid_out(torch.randn(shape, dtype=torch.float64), channels_last)
    blocks = [GlobalContext(shape[1], reduction=4), SimplifiedNonLocal(shape[1])]
    if shape == SMALL_SHAPES[0]:  # the gate's paths; the kernels see every rank as (B, C, N)
        blocks += [SqueezeExcite(shape[1], 4), GlobalContext(shape[1], reduction=4, fusion="both")]
    for block in blocks:
        with native_kernels(kernels):
            assert gradcheck_block(randomize_(block).double(), x)


@needs_kernels
def test_other_dtypes_layouts_and_small_batches_take_the_pytorch_path(spy: Spy) -> None:
    block = randomize_(GlobalContext(8, reduction=4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        block(torch.randn(1, 8, 4, 4))  # fewer samples than threads: BLAS spreads one sample
        block.float()(torch.randn(2, 8, 4, 8)[..., ::2])  # positions strided: neither layout is dense
        assert spy.calls == {"transform_forward": 2}  # the transforms work on (B, C) vectors: any x
        spy.calls.clear()
        block.bfloat16()(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    assert not spy.calls


@needs_kernels
def test_kernels_name_what_they_expect() -> None:
    x = torch.randn(2, 8, 6)
    weight, bias = torch.randn(8), torch.zeros(1)
    with pytest.raises(RuntimeError, match="positions or channels contiguous"):
        strided = torch.randn(2, 6, 8, 3)[..., 0].transpose(1, 2)[:, :, ::2]
        _fused._native.attention_pool(strided, weight, bias, 6)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _fused._native.attention_pool(x.half(), weight.half(), bias, 6)
    with pytest.raises(RuntimeError, match="key weight of 8"):
        _fused._native.attention_pool(x, torch.randn(7), bias, 6)
    with pytest.raises(RuntimeError, match="shape \\(B, C, N\\)"):
        _fused._native.attention_pool(x[0], weight, bias, 6)
    with pytest.raises(RuntimeError, match="positions_per_block > 0"):
        _fused._native.attention_pool(x, weight, bias, 0)
    alpha, context = _fused._native.attention_pool(x, weight, bias, 6)
    channels_last = x.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(RuntimeError, match="grad_out laid out like x"):
        _fused._native.attention_pool_backward(x, channels_last, weight, alpha, context, context, None, 6)
    with pytest.raises(RuntimeError, match="gate \\(B, C\\) = \\(2, 8\\)"):
        _fused._native.attention_pool_backward(x, x, weight, alpha, context, context, context[:, :4], 6)
    with pytest.raises(RuntimeError, match="grad_out laid out like x"):
        _fused._native.fusion_sums(x, channels_last)
    with pytest.raises(RuntimeError, match="scale and shift \\(B, C\\) = \\(2, 8\\)"):
        _fused._native.scale_shift(x, context, context[:, :4].contiguous())
    with pytest.raises(RuntimeError, match="residual laid out like x"):
        _fused._native.scale_shift(x, context, context, channels_last)


# (norm, relu, sigmoid): GC's add transform, SE's gate, and the ablations' other bottlenecks.
TRANSFORM_KINDS = list(itertools.product([True, False], [True, False], [False, True]))


@pytest.fixture(params=[False, True], ids=["256-bit", "512-bit"])
def product_tiles(request: pytest.FixtureRequest):
    """The transforms' products with 32-byte tiles, then with 64-byte ones (where the CPU has AVX-512)."""
    if not native_kernels_available():
        pytest.skip("gcnet._C is not built")
    default = _fused._native.wide_products()
    if _fused._native.wide_products(request.param) != request.param:
        pytest.skip("no AVX-512 on this CPU")
    yield request.param
    _fused._native.wide_products(default)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", TRANSFORM_KINDS, ids=lambda k: "-".join(
    name for name, on in zip(("norm", "relu", "sigmoid"), k) if on) or "plain")
# (32, 1100, 24): the 64-byte products' column chunks (with a remainder) and their transposed second
# product; (17, 600, 40): chunks with an odd row, tiles of 8, 4 and 1 rows.
@pytest.mark.parametrize("B, C, H", [(32, 256, 16), (5, 64, 32), (3, 37, 5), (1, 8, 3), (9, 130, 13), (32, 1100, 24),
                                     (17, 600, 40)])
def test_transform_kernels_match_the_modules_and_autograd(B: int, C: int, H: int, kind: tuple, dtype,
                                                          product_tiles: bool) -> None:
    norm, relu, sigmoid = kind
    transform = randomize_(ContextTransform(C, 4, norm, relu, hidden_channels=H)).to(dtype)
    context = torch.randn(B, C, dtype=dtype, requires_grad=True)
    expected = transform(context)
    expected = expected.sigmoid() if sigmoid else expected
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [context, *transform.parameters()], grad)
    terms = ContextTransforms(transform if sigmoid else None, None if sigmoid else transform)
    with torch.no_grad():
        gate, add, states = terms.native(context)
    got = gate if sigmoid else add
    assert (add if sigmoid else gate) is None
    grad_context, grads = ContextTransforms.native_backward(
        states, context.detach(), list(transform.parameters()),
        grad if sigmoid else None, None if sigmoid else grad,
    )
    # float32: other summation orders; a LayerNorm over 3 channels amplifies rounding (large rstd).
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4
    names = ["output", "context", *(n for n, _ in transform.named_parameters())]
    for name, a, b in zip(names, [got, grad_context, *grads], [expected.detach(), *expected_grads]):
        scale = float(b.abs().max())
        torch.testing.assert_close(
            a, b, rtol=tolerance, atol=tolerance * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@needs_kernels
def test_transform_kernels_pass_gradcheck(product_tiles: bool) -> None:
    transform = randomize_(ContextTransform(32, 4, norm=True, relu=True, hidden_channels=16)).double()
    params = list(transform.parameters())

    class Native(torch.autograd.Function):
        @staticmethod
        def forward(ctx, context, *params):
            gate, _, ctx.states = ContextTransforms(transform, None).native(context)
            ctx.save_for_backward(context, *params)
            return gate

        @staticmethod
        def backward(ctx, grad):
            context, *params = ctx.saved_tensors
            grad_context, grads = ContextTransforms.native_backward(ctx.states, context, params, grad, None)
            return (grad_context, *grads)

    context = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)  # whole 512-bit tiles and a remainder
    assert torch.autograd.gradcheck(Native.apply, (context, *params))


@needs_kernels
def test_transforms_the_kernel_cannot_run_take_the_modules() -> None:
    context = torch.randn(2, 16)

    def native(transform: torch.nn.Module, x: torch.Tensor = context) -> bool:
        with torch.no_grad():
            return ContextTransforms(None, transform).native(x) is not None

    plain = randomize_(ContextTransform(16, 4, norm=True, relu=True))
    assert native(plain)
    assert not native(plain, context.double())  # parameters in another dtype
    assert not native(ContextTransform(16, None, norm=False, relu=False))  # one C -> C layer
    assert not native(torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.GELU(), torch.nn.Linear(4, 16)))
    assert not native(torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False), torch.nn.Linear(4, 16)))
    hooked = randomize_(ContextTransform(16, 4, norm=True, relu=True))
    hooked[1].register_forward_hook(lambda module, args, out: out * 2)
    assert not native(hooked)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native(plain)
    with native_kernels(False):
        assert not native(plain)
    # Where the kernel does not run, the block still computes the modules' numbers.
    block = randomize_(GlobalContext(16, reduction=4)).eval()
    block.add_transform[1].register_forward_hook(lambda module, args, out: out * 2)
    with torch.no_grad():
        expected = block.add_transform(block.context(torch.ones(2, 16, 3, 3)))
        torch.testing.assert_close(block._transforms(block.context(torch.ones(2, 16, 3, 3)))[1], expected)


@needs_kernels
def test_transforms_called_with_grad_keep_the_parameters_graph(spy: Spy) -> None:
    block = randomize_(GlobalContext(16, reduction=4))
    context = torch.randn(2, 16)  # no grad of its own: the parameters still want theirs
    block._transforms(context)[1].sum().backward()
    assert all(p.grad is not None for p in block.add_transform.parameters())
    assert not spy.calls
    with torch.no_grad():
        block._transforms(context)
    assert spy.calls == {"transform_forward": 1}


@needs_kernels
def test_transform_kernels_name_what_they_expect() -> None:
    context, w1, b1 = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    w2, b2 = torch.randn(8, 4), torch.randn(8)
    with pytest.raises(RuntimeError, match="w1 \\(H, 8\\)"):
        _fused._native.transform_forward(
            context, torch.randn(4, 7), b1, None, None, 1e-5, True, w2, b2, False
        )
    with pytest.raises(RuntimeError, match="float32/float64 context"):
        _fused._native.transform_forward(context.half(), w1, b1, None, None, 1e-5, True, w2, b2, False)
    with pytest.raises(RuntimeError, match="both LayerNorm weight and bias"):
        _fused._native.transform_forward(context, w1, b1, torch.ones(4), None, 1e-5, True, w2, b2, False)
    with pytest.raises(RuntimeError, match="contiguous CPU Float w2"):
        _fused._native.transform_forward(context, w1, b1, None, None, 1e-5, True, w2.t(), b2, False)

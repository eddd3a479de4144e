"""The CPU kernels (gcnet._C) against the paper's formula and the PyTorch path they replace."""

import os
import sys
from collections import Counter

import pytest
import torch

from gcnet.blocks import GlobalContext, SimplifiedNonLocal, _fused, native_kernels, native_kernels_available
from tests.blocks.reference import global_context_reference, randomize_
from tests.blocks.shapes import gradcheck_block

needs_kernels = pytest.mark.skipif(not native_kernels_available(), reason="gcnet._C is not built")

# (B, C, *positions): one block per sample, and samples the forward walks in several blocks
# (NCHW above 2 MiB of float64, channels_last above 256 KiB).
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


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_the_pytorch_path(spy: Spy, shape: tuple, channels_last: bool) -> None:
    block = randomize_(GlobalContext(shape[1], reduction=4)).double()
    x = laid_out(torch.randn(shape, dtype=torch.float64) * 2, channels_last)
    grad = laid_out(torch.randn(shape, dtype=torch.float64), channels_last)
    with native_kernels(False):
        expected = outputs_and_grads(block, x, grad)
    assert not spy.calls
    got = outputs_and_grads(block, x, grad)
    assert spy.calls == {"attention_pool": 1, "attention_pool_add_backward": 1}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[1].stride() == x.stride()  # grad_x keeps x's memory layout


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_inference_matches_the_paper_formula(spy: Spy, shape: tuple, channels_last: bool) -> None:
    block = randomize_(GlobalContext(shape[1], reduction=4)).double().eval()
    x = laid_out(torch.randn(shape, dtype=torch.float64), channels_last)
    with torch.no_grad():
        out = block(x)
    assert spy.calls == {"attention_pool": 1}
    if x.numel() < 10_000:  # the reference loops over positions in Python
        expected, _ = global_context_reference(block, x, "attention", "add", bottleneck=True, norm=True, relu=True)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    with native_kernels(False), torch.no_grad():
        torch.testing.assert_close(out, block(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "pytorch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_on_each_path(shape: tuple, channels_last: bool, kernels: bool) -> None:
    if kernels and not native_kernels_available():
        pytest.skip("gcnet._C is not built")
    x = laid_out(torch.randn(shape, dtype=torch.float64), channels_last)
    for block in (GlobalContext(shape[1], reduction=4), SimplifiedNonLocal(shape[1])):
        with native_kernels(kernels):
            assert gradcheck_block(randomize_(block).double(), x)


@needs_kernels
def test_other_dtypes_layouts_and_small_batches_take_the_pytorch_path(spy: Spy) -> None:
    block = randomize_(GlobalContext(8, reduction=4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        block(torch.randn(1, 8, 4, 4))  # fewer samples than threads: BLAS spreads one sample
        block.bfloat16()(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16))
        block.float()(torch.randn(2, 8, 4, 8)[..., ::2])  # positions strided: neither layout is dense
    finally:
        torch.set_num_threads(threads)
    assert not spy.calls


@needs_kernels
def test_kernels_name_what_they_expect() -> None:
    x = torch.randn(2, 8, 6)
    weight, bias = torch.randn(8), torch.zeros(1)
    with pytest.raises(RuntimeError, match="positions or channels contiguous"):
        _fused._native.attention_pool(torch.randn(2, 6, 8, 3)[..., 0].transpose(1, 2)[:, :, ::2], weight, bias)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _fused._native.attention_pool(x.half(), weight.half(), bias)
    with pytest.raises(RuntimeError, match="key weight of 8"):
        _fused._native.attention_pool(x, torch.randn(7), bias)
    with pytest.raises(RuntimeError, match="shape \\(B, C, N\\)"):
        _fused._native.attention_pool(x[0], weight, bias)
    alpha, context = _fused._native.attention_pool(x, weight, bias)
    with pytest.raises(RuntimeError, match="grad_out laid out like x"):
        _fused._native.attention_pool_add_backward(x, x.transpose(1, 2).contiguous().transpose(1, 2), weight,
                                                   alpha, context, context)

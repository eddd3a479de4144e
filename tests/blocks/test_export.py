"""The blocks under torch.compile, torch.jit.trace and ONNX export (onnxruntime checks the graph)."""

import pytest
import torch

from gcnet.blocks import GlobalContext, NonLocal, SimplifiedNonLocal, SqueezeExcite
from tests.blocks.reference import randomize_

BLOCKS = {
    "gc": lambda: GlobalContext(16, reduction=4),
    "gc-both-average": lambda: GlobalContext(16, reduction=4, pooling="average", fusion="both"),
    "snl": lambda: SimplifiedNonLocal(16),
    "se": lambda: SqueezeExcite(16, reduction=4),
    "nl-gaussian": lambda: NonLocal(16, mode="gaussian", subsample=True),
    "nl-embedded": lambda: NonLocal(16, mode="embedded_gaussian", scale="inner"),
    "nl-dot": lambda: NonLocal(16, mode="dot_product", subsample=True),
    "nl-concat": lambda: NonLocal(16, mode="concatenation"),
    "nl-3d": lambda: NonLocal(16, dims=3, subsample=True),
}


def make(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    block = randomize_(BLOCKS[name]()).eval()
    x = torch.randn(2, 16, 4, 8, 8) if name == "nl-3d" else torch.randn(2, 16, 8, 8)
    return block, x


@pytest.mark.parametrize("name", list(BLOCKS))
def test_torch_compile_forward_and_backward(name: str) -> None:
    block, x = make(name)
    block.train()
    compiled = torch.compile(block, fullgraph=True)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out, expected = compiled(x1), block(x2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*deprecated:FutureWarning")
@pytest.mark.parametrize("name", list(BLOCKS))
def test_torch_jit_trace(name: str) -> None:
    block, x = make(name)
    traced = torch.jit.trace(block, x)
    other = torch.randn_like(x)
    torch.testing.assert_close(traced(other), block(other), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_onnx_export_runs_in_onnxruntime(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    block, x = make(name)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(block, (x,), dynamo=True, opset_version=18).save(str(path))
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), block(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gc", "snl", "nl-embedded"])
def test_double_backward_runs_on_the_composite_path(name: str) -> None:
    from gcnet.blocks import composite_autograd

    block, x = make(name)
    block.train()
    x = x.double().requires_grad_(True)
    block.double()
    with composite_autograd():
        (grad,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
        penalty = grad.square().sum()
        penalty.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        (grad,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
        grad.square().sum().backward()


@pytest.mark.parametrize("flag", ["exporter", "dynamo"])
def test_an_onnx_export_in_progress_turns_the_fast_paths_off(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks read the exporters' flags directly (torch.onnx.is_in_onnx_export imports on every call)."""
    from gcnet.blocks import _fused

    flags = _fused._onnx_export_flags()
    assert flags is not None  # this torch keeps them where _fused looks: else it calls the public function
    exporter, dynamo = flags
    assert _fused._eager() and not torch.onnx.is_in_onnx_export()
    if flag == "exporter":
        monkeypatch.setattr(exporter, "in_onnx_export", True)
    else:
        monkeypatch.setattr(dynamo, "_is_onnx_exporting", True)
    assert torch.onnx.is_in_onnx_export() and _fused._in_onnx_export() and not _fused._eager()

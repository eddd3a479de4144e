"""Every registered model: forward, backward, clear input errors, torch.compile."""

from __future__ import annotations

import pytest
import torch

from gcnet.models import create_model, list_models
from tests.models.helpers import is_video, small_input

NUM_CLASSES = 5


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_errors_and_graph_capture(name: str) -> None:
    """Forward + backward at small size on CPU, every parameter gets a finite gradient; wrong
    channels / ranks raise ValueError; torch.compile(fullgraph=True) captures the forward.

    One test per model so each model is built once (30 models on 2 cores). The compile here uses
    the "eager" backend: Dynamo traces the whole forward into one graph (fullgraph=True fails on
    any graph break) and the captured graph runs eagerly. That is what breaks when model code
    is not compile-friendly; AOTAutograd and Inductor code generation are exercised on a few
    models in `test_aot_autograd_compile` and `test_inductor_compile_smallest_model`, because
    running them for the whole registry would take several CPU minutes.
    """
    model = create_model(name, num_classes=NUM_CLASSES)
    x = small_input(name)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    not_finite = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not_finite == []

    wrong_channels = torch.randn(2, 4, *x.shape[2:])
    with pytest.raises(ValueError, match="3 input channels"):
        model(wrong_channels)
    wrong_rank = x[:, :, 0] if is_video(name) else x.unsqueeze(2)
    with pytest.raises(ValueError, match="expects"):
        model(wrong_rank)

    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize(
    "name, options",
    [
        ("cifar_resnet20", {"context": "gc", "reduction": 4, "nonlocal_indices": ((), (1,), ())}),
        ("i3d_resnet50_nl5", {"context": "gc"}),
    ],
)
def test_aot_autograd_compile(name: str, options: dict) -> None:
    """torch.compile with the "aot_eager" backend (Dynamo + AOTAutograd, no code generation) gives
    the eager gradients in training mode: a 2D model with GC and NL blocks, and a video model with
    3D GC and NL blocks (the 2D ImageNet nets share their block code and are captured above)."""
    model = create_model(name, num_classes=NUM_CLASSES, **options)
    if is_video(name):
        model.dropout.p = 0.0  # deterministic, so compiled and eager runs compare
    x = small_input(name)
    model(x).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()
    for n, p in model.named_parameters():
        # fp32 sums in another order (the eager GC path may run gcnet._C): atol scales with the gradient
        atol = 1e-6 * max(1.0, eager[n].abs().max().item())
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=atol, msg=n)


def test_inductor_compile_smallest_model() -> None:
    """One real Inductor compile (C++ code generation) of the smallest registered model with a GC
    block; Inductor compiles of the big nets take minutes on 2 cores, so only this one runs it."""
    model = create_model("cifar_resnet20", num_classes=10, context="gc").eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)

import pytest
import torch
from torch import nn

from gcnet.blocks import GlobalContext
from gcnet.builder import build_optimizer, build_scheduler
from gcnet.config import OptimConfig, ScheduleConfig
from gcnet.engine.optim import lr_factor, parameter_groups


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), GlobalContext(16, reduction=4), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    decay, no_decay = parameter_groups(model, 1e-4, decay_norm_and_bias=False)
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    # conv and linear weights, and the GC block's two linear weights; the GC LayerNorm weight is (C/r, 1, 1).
    assert all(n.endswith("weight") for n in names) and not any(".norm" in n or n.startswith("1.") for n in names)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    everything = parameter_groups(model, 1e-4, decay_norm_and_bias=True)
    assert len(everything) == 1


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers(name: str) -> None:
    optimizer = build_optimizer(nn.Linear(2, 2), OptimConfig(name=name, lr=0.01))
    assert type(optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[name]


def test_warmup_cosine_and_step() -> None:
    kwargs = dict(steps_per_epoch=10, epochs=10, warmup_epochs=1, warmup_start_factor=0.1, milestones=(5, 8),
                  gamma=0.1, min_lr_factor=0.0)
    assert lr_factor(0, name="cosine", **kwargs) == pytest.approx(0.1)
    assert lr_factor(10, name="cosine", **kwargs) == pytest.approx(1.0)
    assert lr_factor(100, name="cosine", **kwargs) == pytest.approx(0.0)
    assert lr_factor(55, name="cosine", **kwargs) == pytest.approx(0.5)
    assert [lr_factor(s, name="step", **kwargs) for s in (10, 49, 50, 80)] == pytest.approx([1, 1, 0.1, 0.01])
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="cosine", warmup_epochs=1), 10, 10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)

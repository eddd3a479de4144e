"""Complexity: params and FLOPs per stage, stored reference numbers, and `gcnet info`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcnet import cli
from gcnet.analysis.complexity import complexity_of, count_flops, count_parameters, model_complexity
from gcnet.models import create_model, list_models

REFERENCE = json.loads((Path(__file__).parents[1] / "reference" / "model_complexity.json").read_text())


def test_reference_numbers_cover_the_registry() -> None:
    """Regenerate with tests/reference/make_model_complexity.py after changing a model."""
    assert sorted(REFERENCE) == list_models()


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_params_and_flops_match_the_reference(name: str) -> None:
    expected = REFERENCE[name]
    report = complexity_of(name, expected["input_shape"])
    assert (report.params, report.flops) == (expected["params"], expected["flops"])


def test_numbers_of_the_papers() -> None:
    """ResNet-50: 25.56M params, 4.1 GMACs ("GFLOPs" in the papers); GC r16 in c3-c5: 28.08M and
    under 0.3% more compute (GCNet Table 1: 4.12 -> 4.13)."""
    base, gc = REFERENCE["resnet50"], REFERENCE["resnet50_gc_r16"]
    assert base["params"] == 25_557_032 and round(gc["params"] / 1e6, 2) == 28.08
    assert round(REFERENCE["resnet50_gc_r4"]["params"] / 1e6, 1) == 35.6
    assert round(base["flops"] / 2e9, 2) == 4.09
    assert 0 < gc["flops"] / base["flops"] - 1 < 0.003


def test_real_model_counts_equal_meta_counts_and_include_attention() -> None:
    """Counting a real CPU model gives the meta-device numbers, non-local attention included
    (CPU attention runs an op that torch's counter does not know by itself)."""
    options = {"context": "gc", "nonlocal_indices": ((), (1,), ())}
    model = create_model("cifar_resnet20", **options)
    real = model_complexity(model, (2, 3, 32, 32))
    meta = complexity_of("cifar_resnet20", (2, 3, 32, 32), **options)
    assert (
        (real.params, real.flops)
        == (meta.params, meta.flops)
        == (count_parameters(model), count_flops(model, (2, 3, 32, 32)))
    )
    block = model.layer2.nonlocal_blocks["1"]
    N, C, inner = 16 * 16, 32, 16  # positions, channels, inner channels of the block in stage 2
    projections = 2 * 2 * N * (3 * C * inner + inner * C)  # theta, phi, g, W_z on batch 2
    attention = 2 * 2 * (2 * N * N * inner)  # two (N x N x C') matmuls on batch 2
    assert count_flops(block, torch.randn(2, C, 16, 16)) == projections + attention
    assert [s.name for s in real.stages] == ["stem", "layer1", "layer2", "layer3", "head"]
    assert sum(s.params for s in real.stages) == real.params
    assert sum(s.flops for s in real.stages) == real.flops
    assert [s.nonlocal_blocks for s in real.stages] == [0, 0, 1, 0, 0]


def test_info_command_prints_a_per_stage_table(capsys: pytest.CaptureFixture[str]) -> None:
    """`gcnet info resnet50_gc_r16`: blocks, params and FLOPs per stage."""
    assert cli.main(["info", "resnet50_gc_r16"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["layer3"][:4] == ["layer3", "6", "6", "0"]  # 6 residual blocks, 6 GC blocks
    assert rows["layer1"][:4] == ["layer1", "3", "0", "0"]
    assert rows["total"][4] == "28.079" and rows["total"][5] == "4.098"  # params (M), GMACs
    assert cli.main(["info", "resnet18", "--option", "context=gc", "--input-shape", "3,64,64"]) == 0
    assert "(1, 3, 64, 64)" in capsys.readouterr().out
    assert cli.main(["info", "resnet5"]) == 2 and "did you mean" in capsys.readouterr().err

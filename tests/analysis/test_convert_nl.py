import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import gcnet
from gcnet.analysis.nl_to_gc import FitReport, convert_model, convert_nonlocal, fit_report
from gcnet.blocks import GlobalContext, NonLocal, SimplifiedNonLocal
from tests.blocks.reference import randomize_

SHAPES = {1: (7,), 2: (5, 4), 3: (2, 3, 3)}  # positions per sample exceed C = 8: the key is identified
NEW_SHAPES = {1: (9,), 2: (3, 6), 3: (3, 2, 4)}


def query_independent_(block: NonLocal) -> NonLocal:
    """Random weights and BN statistics, then theta's weight zero: logits_ij = b_theta . phi_j for every i."""
    randomize_(block)
    with torch.no_grad():
        block.theta.weight.zero_()
    return block.double().eval()


def inputs(count: int, channels: int, shape: tuple[int, ...], batch: int = 2) -> list[Tensor]:
    return [torch.randn(batch, channels, *shape, dtype=torch.float64) for _ in range(count)]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("norm, scale", [(True, "none"), (False, "inner")])
def test_an_exactly_query_independent_block_converts_exactly(dims: int, norm: bool, scale: str) -> None:
    block = query_independent_(NonLocal(8, dims=dims, norm=norm, scale=scale))
    before = {k: v.clone() for k, v in block.state_dict().items()}
    converted, report = convert_nonlocal(block, inputs(3, 8, SHAPES[dims]), steps=20)
    assert type(converted) is SimplifiedNonLocal and isinstance(converted, GlobalContext)
    assert converted.key.weight.dtype == torch.float64 and not converted.training
    assert report.kl_fitted < 1e-12 < report.kl_uniform and report.cosine_distance < 1e-12 and report.samples == 6
    held_out = torch.randn(3, 8, *NEW_SHAPES[dims], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(held_out), block(held_out), rtol=0, atol=1e-8)
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items()) and not block.training


def test_gaussian_mode_is_exact_where_its_maps_are_query_independent() -> None:
    # exp(x_i . x_j) is the same map for every i only if (x_i - x_l) . (x_j - x_k) = 0 for all i, l, j, k,
    # i.e. every position holds the same vector: then both maps are uniform. Checked on such inputs.
    block = randomize_(NonLocal(8, mode="gaussian", scale="channels")).double().eval()
    converted, report = convert_nonlocal(block, inputs(2, 8, (5, 5)), steps=20)
    assert report.kl_fitted < report.kl_uniform
    constant = torch.randn(3, 8, 1, 1, dtype=torch.float64).expand(3, 8, 4, 5).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(converted(constant), block(constant), rtol=0, atol=1e-8)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
def test_a_random_block_fits_better_than_the_uniform_map_on_held_out_inputs(mode: str) -> None:
    block = randomize_(NonLocal(16, mode=mode, scale="inner")).double().eval()
    calibration = [x.relu() for x in inputs(3, 16, (6, 6), batch=4)]  # post-ReLU features, as in a ResNet
    converted, report = convert_nonlocal(block, calibration)
    assert 0 < report.kl_fitted < report.kl_uniform and report.cosine_distance > 0.01
    held_out = fit_report(block, converted, [x.relu() for x in inputs(2, 16, (6, 6), batch=4)])
    assert isinstance(held_out, FitReport) and held_out.samples == 8
    assert held_out.kl_fitted < held_out.kl_uniform
    _, start = convert_nonlocal(block, calibration, steps=0)
    assert report.kl_fitted < start.kl_fitted


def test_the_value_path_fold_is_exact_for_any_key() -> None:
    block = randomize_(NonLocal(8)).double().eval()
    converted, _ = convert_nonlocal(block, inputs(1, 8, (4, 4)), steps=0)
    with torch.no_grad():
        converted.key.weight.normal_()
        converted.key.bias.normal_()
        x = torch.randn(3, 8, 5, 3, dtype=torch.float64)
        alpha = converted.attention_map(x)  # (B, 1, N)
        context = (x.flatten(2) * alpha).sum(-1)  # (B, C)
        by_hand = x + block.bn(block.w_z(block.g(context)))[..., None, None]
        torch.testing.assert_close(converted(x), by_hand, rtol=0, atol=1e-10)


def test_the_result_follows_the_blocks_dtype_and_mode() -> None:
    block = randomize_(NonLocal(8)).train()
    converted, _ = convert_nonlocal(block, [torch.randn(2, 8, 4, 4)], steps=2)
    assert converted.key.weight.dtype == torch.float32 and converted.training and block.training


def test_convert_model_replaces_every_block_and_keeps_the_logits() -> None:
    model = gcnet.create_model("cifar_resnet20", num_classes=10, nonlocal_indices=[[], [1], [1]]).double().eval()
    for module in model.modules():
        if isinstance(module, NonLocal):
            query_independent_(module)
    calibration = [torch.randn(4, 3, 16, 16, dtype=torch.float64) for _ in range(2)]
    converted, reports = convert_model(model, calibration, steps=10)
    assert sorted(reports) == ["layer2.nonlocal_blocks.1", "layer3.nonlocal_blocks.1"]
    assert all(r.kl_fitted < 1e-12 and r.samples == 8 for r in reports.values())
    assert [n for n, m in converted.named_modules() if isinstance(m, NonLocal)] == []
    assert all(isinstance(converted.get_submodule(name), SimplifiedNonLocal) for name in reports)
    assert sum(isinstance(m, NonLocal) for m in model.modules()) == 2  # the original is untouched
    assert all(not m._forward_pre_hooks for m in model.modules()) and not converted.training
    held_out = torch.randn(3, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(held_out), model(held_out), rtol=0, atol=1e-8)


def test_convert_model_refuses_a_model_without_nl_blocks() -> None:
    with pytest.raises(ValueError, match="has no NonLocal block"):
        convert_model(nn.Sequential(nn.Conv2d(3, 8, 1)), [torch.randn(1, 3, 4, 4)])


@pytest.mark.parametrize(
    "block, reason",
    [
        (NonLocal(8, mode="dot_product"), "not softmax distributions"),
        (NonLocal(8, mode="concatenation"), "not softmax distributions"),
        (NonLocal(8, subsample=True), "non-linear in x"),
    ],
)
def test_blocks_that_cannot_be_folded_are_refused_with_the_reason(block: NonLocal, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        convert_nonlocal(block, [torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=f"1: .*{reason}"):
        convert_model(nn.Sequential(nn.Identity(), block), [torch.randn(1, 8, 4, 4)])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="expected a NonLocal block"):
        convert_nonlocal(GlobalContext(8, reduction=2), [torch.randn(1, 8, 4, 4)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        convert_nonlocal(NonLocal(8), [torch.randn(1, 8, 4, 4)], steps=-1)
    with pytest.raises(ValueError, match="no calibration inputs"):
        convert_nonlocal(NonLocal(8), [])


def test_the_convert_nl_command(tmp_path: Path, capsys) -> None:
    from gcnet.builder import train
    from gcnet.cli import main
    from gcnet.config import config_from_dict
    from tests.engine.tiny import image_config, make_image_folder

    images = make_image_folder(tmp_path / "images", classes=3, per_class=2, size=16)
    config = image_config(
        images,
        tmp_path / "run",
        model={"name": "cifar_resnet20", "nonlocal_blocks": {"indices": [[], [1], [1]]}},
        data={"image_size": 16, "val_fraction": 0.0},
        train={"epochs": 1},
    )
    train(config_from_dict(config))
    out = tmp_path / "converted"
    argv = ["convert-nl", str(tmp_path / "run"), "--data", str(images), "--out", str(out)]
    assert main(argv + ["--batches", "1", "--batch-size", "4", "--steps", "5"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert sorted(report["blocks"]) == ["layer2.nonlocal_blocks.1", "layer3.nonlocal_blocks.1"]
    for block in report["blocks"].values():
        assert block["kl_fitted"] <= block["kl_uniform"] + 1e-9 and block["samples"] == 4
    assert set(report["top1"]) == {"original", "converted"} and report["samples"] == 6
    assert report["calibration"] == str(images)  # the run's training data by default
    assert 0 < report["macs"]["converted"] < report["macs"]["original"]
    assert (out / "converted.safetensors").stat().st_size > 10_000
    assert main(argv + ["--steps", "-1"]) == 2
    assert "gcnet convert-nl: batches and batch_size must be >= 1 and steps >= 0" in capsys.readouterr().err

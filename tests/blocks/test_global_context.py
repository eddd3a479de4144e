import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gcnet.blocks import (
    GlobalContext,
    SimplifiedNonLocal,
    SqueezeExcite,
    composite_autograd,
    get_context_block,
)
from tests.blocks.reference import global_context_reference, randomize_
from tests.blocks.shapes import gradcheck_block, sample

# (constructor options, reference description): every cell of the paper's ablation grid.
CONFIGS = [
    pytest.param(dict(), dict(pooling="attention", fusion="add", bottleneck=True, norm=True, relu=True), id="gc"),
    pytest.param(dict(pooling="average"), dict(pooling="average", fusion="add", bottleneck=True, norm=True, relu=True), id="avg-add"),
    pytest.param(dict(fusion="scale"), dict(pooling="attention", fusion="scale", bottleneck=True, norm=True, relu=True), id="att-scale"),
    pytest.param(dict(fusion="both"), dict(pooling="attention", fusion="both", bottleneck=True, norm=True, relu=True), id="att-both"),
    pytest.param(dict(norm=False), dict(pooling="attention", fusion="add", bottleneck=True, norm=False, relu=True), id="no-ln"),
    pytest.param(dict(norm=False, relu=False), dict(pooling="attention", fusion="add", bottleneck=True, norm=False, relu=False), id="ratio-only"),
    pytest.param(dict(reduction=None, norm=False, relu=False), dict(pooling="attention", fusion="add", bottleneck=False, norm=False, relu=False), id="no-ratio"),
    pytest.param(dict(fusion="both", hidden_channels=3), dict(pooling="attention", fusion="both", bottleneck=True, norm=True, relu=True), id="hidden-3"),
]


def build(options: dict) -> GlobalContext:
    return randomize_(GlobalContext(8, **{"reduction": 4, **options})).double()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("options,ref", CONFIGS)
def test_matches_paper_reference(options: dict, ref: dict, dims: int) -> None:
    block = build(options)
    x = sample(dims)
    expected, alpha = global_context_reference(block, x, **ref)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(block.attention_map(x), alpha, rtol=0, atol=1e-12)
    torch.testing.assert_close(block.context(x), torch.bmm(x.flatten(2), alpha.transpose(1, 2)).squeeze(-1))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_snl_and_se_are_their_framework_instances(dims: int) -> None:
    x = sample(dims)
    snl = randomize_(SimplifiedNonLocal(8)).double()
    expected, _ = global_context_reference(snl, x, "attention", "add", bottleneck=False, norm=False, relu=False)
    torch.testing.assert_close(snl(x), expected, rtol=0, atol=1e-10)
    se = randomize_(SqueezeExcite(8, reduction=2)).double()
    expected, _ = global_context_reference(se, x, "average", "scale", bottleneck=True, norm=False, relu=True)
    torch.testing.assert_close(se(x), expected, rtol=0, atol=1e-10)


def test_parameter_count_matches_paper_formula() -> None:
    for C, r in [(256, 16), (512, 16), (1024, 4), (2048, 16)]:
        count = sum(p.numel() for p in GlobalContext(C, reduction=r).parameters())
        assert count == 2 * C * C // r + 2 * C + 3 * C // r + 1
    assert sum(p.numel() for p in SimplifiedNonLocal(64).parameters()) == 64 * 64 + 64 + 64 + 1


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("options,ref", CONFIGS)
def test_gradcheck_input_and_parameters(options: dict, ref: dict, dims: int) -> None:
    block = build(options)
    x = sample(dims)[:, :, :3].clone() if dims == 1 else sample(dims)
    assert gradcheck_block(block, x)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("block", [GlobalContext(8, reduction=4), GlobalContext(8, reduction=4, pooling="average"), SimplifiedNonLocal(8)], ids=["gc", "avg-add", "snl"])
def test_add_fusion_is_identity_at_init(block: GlobalContext, dims: int) -> None:
    x = sample(dims, torch.float32)
    assert torch.equal(block(x), x)


ADD_CONFIGS = [c for c in CONFIGS if c.values[1]["fusion"] == "add"]


@pytest.mark.parametrize("options,ref", ADD_CONFIGS)
def test_added_term_is_the_same_at_every_position(options: dict, ref: dict) -> None:
    block = build(options)
    x = sample(2)
    delta = (block(x) - x).flatten(2)
    torch.testing.assert_close(delta, delta[:, :, :1].expand_as(delta), rtol=0, atol=1e-12)
    assert delta.abs().max() > 1e-3


@pytest.mark.parametrize("options,ref", CONFIGS)
def test_samples_do_not_depend_on_each_other(options: dict, ref: dict) -> None:
    block = build(options).eval()
    x = torch.randn(4, 8, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(block(x)[1:3], block(x[1:3]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("options,ref", CONFIGS)
def test_channels_last_gives_the_same_result(options: dict, ref: dict) -> None:
    block = build(options)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    out = block(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, block(x), rtol=0, atol=1e-12)
    x3 = torch.randn(2, 8, 2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(block(x3.contiguous(memory_format=torch.channels_last_3d)), block(x3), rtol=0, atol=1e-12)


def test_attention_map_is_a_distribution_and_average_is_uniform() -> None:
    x = sample(2)
    weights = build({}).attention_map(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 1, dtype=x.dtype))
    assert (weights > 0).all()
    uniform = build({"pooling": "average"}).attention_map(x)
    assert torch.equal(uniform, torch.full_like(uniform, 1 / 16))


def test_reset_parameters_restores_identity() -> None:
    block = build({})
    x = sample(2)
    assert not torch.equal(block(x), x)
    block.reset_parameters()
    assert torch.equal(block(x), x)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(channels=8, pooling="max"), ValueError, r"unknown pooling 'max'; expected one of \['attention', 'average'\]"),
        (dict(channels=8, fusion="mul"), ValueError, r"unknown fusion 'mul'; expected one of \['add', 'scale', 'both'\]"),
        (dict(channels=8, reduction=16), ValueError, "reduction=16 leaves no channels for channels=8"),
        (dict(channels=8, reduction=0), ValueError, "reduction must be >= 1, got 0"),
        (dict(channels=8, reduction=2.0), TypeError, "reduction must be an int, got float"),
        (dict(channels=0), ValueError, "channels must be >= 1"),
        (dict(channels=8, reduction=None), ValueError, "with reduction=None .* pass norm=False, relu=False"),
        (dict(channels=8, reduction=None, norm=False, relu=False, hidden_channels=4), ValueError, "hidden_channels belong to the bottleneck"),
        (dict(channels=8, hidden_channels=0), ValueError, "hidden_channels must be >= 1, got 0"),
        (dict(channels=8, hidden_channels=2.0), TypeError, "hidden_channels must be an int, got float"),
        (dict(channels=8, reduction=0, hidden_channels=2), ValueError, "reduction must be >= 1, got 0"),
        (dict(channels=8, reduction=4, norm_eps=0.0), ValueError, r"norm_eps must be a finite number > 0 .* got 0.0"),
        (dict(channels=8, reduction=4, norm_eps=-1e-6), ValueError, "norm_eps must be a finite number > 0"),
        (dict(channels=8, reduction=4, norm_eps=float("nan")), ValueError, "norm_eps must be a finite number > 0"),
        (dict(channels=8, reduction=4, norm_eps="1e-6"), TypeError, "norm_eps must be a float, got str"),
        (dict(channels=8, reduction=4, norm_eps=True), TypeError, "norm_eps must be a float, got bool"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        GlobalContext(**kwargs)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.randn(2, 4, 5, 5), ValueError, r"expects 8 input channels \(dim 1\), got 4"),
        (torch.randn(2, 8), ValueError, r"expects input \(B, C, L\) or \(B, C, H, W\) or \(B, C, T, H, W\) with C=8, got shape \(2, 8\)"),
        (torch.randn(2, 8, 1, 1, 1, 1), ValueError, "got shape"),
        (torch.randn(2, 8, 0, 5), ValueError, r"non-empty input, got shape \(2, 8, 0, 5\)"),
        (torch.ones(2, 8, 3, 3, dtype=torch.long), TypeError, "floating-point input, got dtype torch.int64"),
    ],
)
def test_bad_input_is_named(x: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        GlobalContext(8, reduction=4)(x)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("make", [lambda: SimplifiedNonLocal(8), lambda: SqueezeExcite(8, reduction=2)], ids=["snl", "se"])
def test_gradcheck_snl_and_se(make, dims: int) -> None:
    block = randomize_(make()).double()
    x = sample(dims)
    assert gradcheck_block(block, x)


def bottleneck_reference(block: GlobalContext, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x + W_2 ReLU(LN_eps(W_1 c)) with F.layer_norm at `eps`, from the block's context and weights."""
    fc1, norm, _, fc2 = block.add_transform
    hidden = F.linear(block.context(x), fc1.weight, fc1.bias)
    hidden = F.layer_norm(hidden, hidden.shape[-1:], norm.weight, norm.bias, eps)
    add = F.linear(hidden.relu(), fc2.weight, fc2.bias)
    return x + add.view(*add.shape, *([1] * (x.dim() - 2)))


def test_hidden_channels_and_norm_eps_set_the_bottleneck() -> None:
    """hidden_channels overrides C // r (here r=16 > C would leave none); norm_eps reaches the LayerNorm."""
    block = GlobalContext(8, fusion="both", hidden_channels=3, norm_eps=1e-6)
    for transform in (block.add_transform, block.scale_transform):
        assert transform[0].weight.shape == (3, 8) and transform[-1].weight.shape == (8, 3)
        assert isinstance(transform[1], nn.LayerNorm) and transform[1].eps == 1e-6
    se = SqueezeExcite(64, hidden_channels=8)  # timm's width, not 64 // 16
    assert se.scale_transform[0].weight.shape == (8, 64)


def test_a_bottleneck_too_narrow_for_layer_norm_warns_and_is_degenerate() -> None:
    """LayerNorm over one channel leaves its bias: the block adds the same term whatever the input."""
    with pytest.warns(UserWarning, match=r"1-channel bottleneck \(channels=16, reduction=16\) outputs only"):
        block = GlobalContext(16, reduction=16)
    with pytest.warns(UserWarning, match="2-channel bottleneck"):
        GlobalContext(32, reduction=16)
    randomize_(block)
    x, y = torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(block(x) - x, block(y) - y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GlobalContext(48, reduction=16)  # 3 channels: no warning
        GlobalContext(16, reduction=16, norm=False)


def test_new_options_leave_the_defaults_unchanged() -> None:
    default, explicit = GlobalContext(256), GlobalContext(256, hidden_channels=16, norm_eps=1e-5)
    assert {k: v.shape for k, v in default.state_dict().items()} == {
        k: v.shape for k, v in explicit.state_dict().items()
    }
    assert default.add_transform[1].eps == 1e-5
    assert default.extra_repr() == "channels=256, reduction=16, pooling='attention', fusion='add'"
    assert SqueezeExcite(64).extra_repr() == "channels=64, reduction=16"


def test_repr_shows_the_options_that_are_not_default() -> None:
    block = GlobalContext(8, hidden_channels=3, norm_eps=1e-6)
    assert block.extra_repr() == (
        "channels=8, hidden_channels=3, norm_eps=1e-06, pooling='attention', fusion='add'"
    )
    eps_only = GlobalContext(8, reduction=4, norm_eps=1e-6).extra_repr()
    assert eps_only == "channels=8, reduction=4, norm_eps=1e-06, pooling='attention', fusion='add'"
    assert SqueezeExcite(64, hidden_channels=8).extra_repr() == "channels=64, hidden_channels=8"


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_norm_eps_is_the_layer_norms(dims: int) -> None:
    block = randomize_(GlobalContext(8, hidden_channels=3, norm_eps=1e-6)).double()
    x = sample(dims)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, bottleneck_reference(block, x, 1e-6), rtol=0, atol=1e-12)
        assert (out - bottleneck_reference(block, x, 1e-5)).abs().max() > 1e-9  # the eps is seen


def test_fused_path_with_hidden_channels_and_norm_eps_matches_composite() -> None:
    """Attention pooling + add takes the fused autograd function; its Linear sizes come from the block."""
    block = randomize_(GlobalContext(8, hidden_channels=3, norm_eps=1e-6)).double()
    x = sample(2).requires_grad_(True)
    results = []
    for context in (torch.enable_grad, composite_autograd):
        with context():
            out = block(x)
            grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
        results.append((out.detach(), grads))
    (fused, fused_grads), (composite, composite_grads) = results
    torch.testing.assert_close(fused, composite, rtol=0, atol=1e-12)
    for a, b in zip(fused_grads, composite_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused, bottleneck_reference(block, x.detach(), 1e-6), rtol=0, atol=1e-12)


def test_factory_takes_the_new_options_by_name() -> None:
    block = get_context_block("gc", hidden_channels=3, norm_eps=1e-6)(8)
    assert block.add_transform[0].out_features == 3 and block.add_transform[1].eps == 1e-6
    assert get_context_block("se", hidden_channels=8)(64).scale_transform[0].out_features == 8
    with pytest.raises(TypeError, match=r"block 'se' got unknown options \['norm_eps'\]"):
        get_context_block("se", norm_eps=1e-6)  # SE has no LayerNorm

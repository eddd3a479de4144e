import pytest
import torch

from gcnet.blocks import GlobalContext, SimplifiedNonLocal, SqueezeExcite
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
        (dict(channels=8, reduction=None), ValueError, "with reduction=None .* pass norm=False and relu=False"),
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

import pytest
import torch

from gcnet.blocks import NonLocal, non_local
from tests.blocks.reference import non_local_reference, randomize_
from tests.blocks.shapes import gradcheck_block, sample

MODES = ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]


def build(mode: str, dims: int, **options) -> NonLocal:
    return randomize_(NonLocal(8, mode=mode, dims=dims, **options)).double().eval()


@pytest.mark.parametrize("subsample", [False, True], ids=["full", "subsample"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_matches_paper_reference(mode: str, dims: int, subsample: bool) -> None:
    block = build(mode, dims, subsample=subsample)
    x = sample(dims)
    expected, maps = non_local_reference(block, x)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(block.attention_map(x), maps, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_pooling_the_input_as_the_released_code_matches_its_reference(mode: str, dims: int) -> None:
    block = build(mode, dims, subsample=True, subsample_at="input")
    x = sample(dims)
    expected, maps = non_local_reference(block, x)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(block.attention_map(x), maps, rtol=0, atol=1e-12)
    paper = build(mode, dims, subsample=True)
    paper.load_state_dict(block.state_dict())
    assert not torch.allclose(paper(x), block(x))  # max-pool and g (and phi) do not commute
    assert block.subsample_at == "input" and "subsample_at='input'" in repr(block)
    gradcheck_block(block, x)
    with pytest.raises(ValueError, match=r"subsample_at.*'projections', 'input'"):
        NonLocal(8, subsample=True, subsample_at="before")


@pytest.mark.parametrize("scale", ["inner", "channels", 0.3])
@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian"])
def test_softmax_scale_options(mode: str, scale) -> None:
    block = build(mode, 2, scale=scale)
    key_dim = 8 if mode == "gaussian" else 4
    factor = {"inner": key_dim**-0.5, "channels": 8**-0.5}.get(scale, scale)
    assert block.scale_factor == pytest.approx(factor)
    x = sample(2)
    expected, _ = non_local_reference(block, x)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)


def test_without_norm_w_z_has_bias_and_starts_at_zero() -> None:
    block = NonLocal(8, norm=False)
    assert block.bn is None and block.w_z.bias is not None
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(block(x), x)
    randomize_(block).double()
    expected, _ = non_local_reference(block, sample(2))
    torch.testing.assert_close(block(sample(2)), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_input_and_parameters(mode: str, dims: int) -> None:
    block = build(mode, dims, subsample=dims != 1).train()
    x = sample(dims)
    assert gradcheck_block(block, x)


# (samples, rows): bands of 3 rows (the last of 2), whole samples one or two at a time, and both.
@pytest.mark.parametrize("block", [(1, 3), (1, 20), (2, 20), (2, 7)])
def test_blockwise_attention_backward_over_several_blocks(monkeypatch: pytest.MonkeyPatch,
                                                          block: tuple[int, int]) -> None:
    from gcnet.blocks import _fused

    monkeypatch.setattr(_fused, "attention_blocks", lambda *shape: block)
    q, k, v = (torch.randn(3, n, 4, dtype=torch.float64, requires_grad=True) for n in (20, 10, 10))
    assert torch.autograd.gradcheck(lambda *t: _fused.BlockwiseAttention.apply(*t, 0.3), (q, k, v))
    out = _fused.BlockwiseAttention.apply(q, k, v, 0.3)
    expected = torch.softmax(q @ k.transpose(1, 2) * 0.3, dim=-1) @ v
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(got, torch.autograd.grad(expected, (q, k, v), grad), rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN:UserWarning")  # mkldnn.flags
@pytest.mark.parametrize("rows", [3, 20])  # bands of 3 query rows (the last of 2), or whole samples
def test_onednn_attention_forward_and_backward_match_the_float64_formula(monkeypatch: pytest.MonkeyPatch,
                                                                         rows: int) -> None:
    from gcnet.blocks import _fused

    _fused._onednn_matmul.cache_clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the probe's first call may come under autocast
        assert _fused._onednn_matmul() is not None  # this torch's oneDNN matmul agrees with torch.mm
    monkeypatch.setattr(_fused, "_ONEDNN_CHOICE", True)  # whatever this machine's probe found
    monkeypatch.setattr(_fused, "attention_blocks", lambda *shape: (1, rows))
    monkeypatch.setattr(_fused, "attention_rows", lambda *shape: rows)
    monkeypatch.setattr(_fused, "ONEDNN_ATTENTION_MIN_WORK", 0)
    products, mm_t = [], _fused._mm_t
    monkeypatch.setattr(_fused, "_mm_t", lambda a, b, onednn: products.append(onednn) or mm_t(a, b, onednn))
    q, k, v = (torch.randn(3, n, 4, requires_grad=True) for n in (20, 10, 10))
    out = _fused.BlockwiseAttention.apply(q, k, v, 0.3)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    assert products and all(products)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected = torch.softmax(exact[0] @ exact[1].transpose(1, 2) * 0.3, dim=-1) @ exact[2]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_fused.onednn_attention_forward(q.detach(), k.detach(), v.detach(), 0.3), out)
    for g, e in zip(got, torch.autograd.grad(expected, exact, grad.double())):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not _fused.onednn_attention(q, k, v)
    assert not _fused.onednn_attention(q.double(), k, v)
    monkeypatch.setattr(_fused, "ONEDNN_ATTENTION_MIN_WORK", 20 * 10 * 4 + 1)  # one multiply-add short
    assert not _fused.onednn_attention(q, k, v)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*deprecated:FutureWarning")
def test_onednn_products_follow_the_measured_speedup_unless_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from gcnet.blocks import _fused, describe_onednn_products, onednn_products

    probes = (_fused.onednn_speedup, _fused._onednn_matmul)
    for probe in probes:
        probe.cache_clear()
    with FlopCounterMode(display=False) as flops:  # a first call inside a dispatch mode: not counted
        assert _fused.onednn_speedup() > 0
    assert flops.get_total_flops() == 0
    for probe in probes:
        probe.cache_clear()
    graph = str(torch.jit.trace(lambda t: t * _fused.onednn_speedup(), torch.ones(2)).graph)  # nor traced
    assert "aten::mm" not in graph and "linear_pointwise" not in graph and "aten::mul" in graph
    x = torch.randn(2, 3)
    for speedup, expected in ((1.0, False), (_fused.ONEDNN_MIN_SPEEDUP, True), (None, False)):
        monkeypatch.setattr(_fused, "onednn_speedup", lambda value=speedup: value)
        assert _fused.onednn_float32(x) is expected
        for pinned in (True, False):
            with onednn_products(pinned):
                assert _fused.onednn_float32(x) is pinned
                assert not _fused.onednn_float32(x.double())
                assert not _fused.onednn_float32(x.to(torch.bfloat16))
        assert _fused.onednn_float32(x) is expected
    monkeypatch.setattr(_fused, "onednn_speedup", lambda: 2.0)
    assert describe_onednn_products() == "oneDNN (oneDNN's GEMM ran 2.00x MKL's speed here)"
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as torch's cudnn.benchmark, no timed choice there
    try:
        assert not _fused.onednn_float32(x)
        assert describe_onednn_products() == "MKL (deterministic algorithms: not timed)"
        with onednn_products(True):
            assert _fused.onednn_float32(x)
            assert describe_onednn_products() == "oneDNN (pinned by onednn_products)"
    finally:
        torch.use_deterministic_algorithms(deterministic)
    block, x = NonLocal(8, dims=2).float().train(), torch.randn(2, 8, 4, 4, requires_grad=True)
    conv2d, calls = torch.nn.functional.conv2d, []
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or conv2d(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # oneDNN's path: one thread keeps bmm below batch 16
    try:
        block(x).sum().backward()
        assert not calls  # 2 * 16 positions * 8 * 4 channels: too few multiply-adds for oneDNN
        monkeypatch.setattr(non_local, "ONEDNN_PROJECTION_MIN_WORK", 2 * 16 * 8 * 4)
        block(x).sum().backward()
        assert len(calls) == 4  # theta, phi, g, W_z
        with onednn_products(False):
            block(x).sum().backward()
        assert len(calls) == 4
    finally:
        torch.set_num_threads(threads)


def test_blockwise_attention_blocks_take_whole_samples_or_bands_that_grow_with_the_head_dim() -> None:
    from gcnet.blocks import _fused

    bands = {d: _fused.attention_blocks(1, 16384, 16384, d, 4) for d in (16, 32, 64, 128)}
    assert all(samples == 1 for samples, _ in bands.values())
    assert bands[64][1] >= 64 * 64 // 32 and bands[128][1] >= 128 * 128 // 32
    assert bands[16][1] <= bands[32][1] <= bands[64][1] <= bands[128][1]
    samples, rows = _fused.attention_blocks(128, 256, 256, 16, 4)  # CIFAR's 16x16 maps, batch 128
    assert rows == 256 and 1 <= samples < 128 and samples * 256 * 256 <= 1 << 20
    assert _fused.attention_blocks(3, 5, 7, 64, 4) == (3, 5)
    assert _fused.attention_blocks(1, 1, 1 << 30, 1, 4) == (1, 1)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_identity_at_init(mode: str, dims: int, norm: bool) -> None:
    block = NonLocal(8, mode=mode, dims=dims, subsample=True, norm=norm).train()
    x = sample(dims, torch.float32)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("mode", MODES)
def test_permuting_positions_permutes_the_output(mode: str) -> None:
    block = build(mode, 2)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    perm = torch.randperm(30)
    permuted = x.flatten(2)[:, :, perm].reshape(x.shape)
    torch.testing.assert_close(block(permuted).flatten(2), block(x).flatten(2)[:, :, perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_samples_do_not_depend_on_each_other(mode: str) -> None:
    block = build(mode, 2, subsample=True)
    x = torch.randn(4, 8, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(block(x)[1:3], block(x[1:3]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("subsample", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_channels_last_gives_the_same_result(mode: str, subsample: bool) -> None:
    block = build(mode, 2, subsample=subsample)
    x = torch.randn(2, 8, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), block(x), rtol=0, atol=1e-12)
    block3 = build(mode, 3, subsample=subsample)
    x3 = torch.randn(2, 8, 2, 4, 4, dtype=torch.float64)
    out = block3(x3.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, block3(x3), rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN:UserWarning")  # mkldnn.flags
@pytest.mark.parametrize("subsample_at", [None, "projections", "input"])
@pytest.mark.parametrize("dims, layout", [(1, None), (2, None), (3, None), (2, torch.channels_last),
                                          (3, torch.channels_last_3d)])
@pytest.mark.parametrize("mode", MODES)
def test_float32_cpu_projections_and_attention_run_through_onednn_with_the_float64_results(
    mode: str, dims: int, layout: torch.memory_format | None, subsample_at: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gcnet.blocks import _fused

    options = {} if subsample_at is None else {"subsample": True, "subsample_at": subsample_at}
    exact = build(mode, dims, **options).train()
    block = build(mode, dims, **options).float().train()
    block.load_state_dict(exact.state_dict())
    x = sample(dims) if layout is None else sample(dims).contiguous(memory_format=layout)
    conv2d, calls = torch.nn.functional.conv2d, []
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or conv2d(*a, **k))
    monkeypatch.setattr(_fused, "ONEDNN_ATTENTION_MIN_WORK", 0)  # attention through oneDNN too
    monkeypatch.setattr(_fused, "_ONEDNN_CHOICE", True)  # whatever this machine's probe found
    monkeypatch.setattr(non_local, "ONEDNN_PROJECTION_MIN_WORK", 0)  # projections through oneDNN too
    products, mm_t = [], _fused._mm_t
    monkeypatch.setattr(_fused, "_mm_t", lambda a, b, onednn: products.append(onednn) or mm_t(a, b, onednn))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # oneDNN's path: one thread keeps bmm below batch 16, as torch would
    outputs, grads = [], []
    try:
        for model, inputs in ((exact, x), (block, x.float())):
            for enabled in (True, False):  # oneDNN off: the float32 block takes the bmm form
                inputs = inputs.detach().requires_grad_(True)
                model.zero_grad()
                with torch.backends.mkldnn.flags(enabled=enabled):
                    out = model(inputs)
                    (out * torch.linspace(-1, 1, out.numel()).view(out.shape).to(out)).sum().backward()
                outputs.append(out.detach().double())
                grads.append([inputs.grad.double()] + [p.grad.double() for p in model.parameters()])
        with torch.no_grad():
            evaluated = block.eval()(x.float()).double()  # the forward without autograd (BN: running stats)
            torch.testing.assert_close(evaluated, exact.eval()(x), rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2 * (2 if mode == "gaussian" else 4)  # g [theta, phi], W_z: float32, oneDNN on
    assert any(products) == (mode in ("gaussian", "embedded_gaussian"))  # the softmax modes' attention
    for out, grad in zip(outputs[1:], grads[1:]):
        torch.testing.assert_close(out, outputs[0], rtol=1e-4, atol=1e-5)
        for got, expected in zip(grad, grads[0]):
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_softmax_rows_sum_to_one_and_odd_sizes_pool_by_floor() -> None:
    block = build("embedded_gaussian", 2, subsample=True)
    x = torch.randn(1, 8, 5, 7, dtype=torch.float64)
    maps = block.attention_map(x)
    assert maps.shape == (1, 35, 2 * 3)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 35, dtype=x.dtype))
    expected, _ = non_local_reference(block, x)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)


def test_parameter_count() -> None:
    block = NonLocal(1024, reduction=2)
    # theta, phi, g: C x C/2 + C/2 each; W_z: C/2 x C (no bias before BN); BN: 2C.
    assert sum(p.numel() for p in block.parameters()) == 3 * (1024 * 512 + 512) + 512 * 1024 + 2 * 1024


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(mode="cosine"), ValueError, r"unknown mode 'cosine'; expected one of \['gaussian', 'embedded_gaussian', 'dot_product', 'concatenation'\]"),
        (dict(dims=4), ValueError, "dims must be 1, 2 or 3, got 4"),
        (dict(reduction=9), ValueError, "reduction=9 leaves no channels for channels=8"),
        (dict(scale="sqrt"), ValueError, r"unknown scale 'sqrt'; expected one of \['none', 'inner', 'channels'\]"),
        (dict(scale=-1.0), ValueError, "positive number, got -1.0"),
        (dict(mode="dot_product", scale="inner"), ValueError, "scale='inner' applies to the softmax modes"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        NonLocal(8, **kwargs)


@pytest.mark.parametrize(
    "block,x,error,match",
    [
        (NonLocal(8, dims=2), torch.randn(2, 8, 4, 4, 4), ValueError, r"expects input \(B, C, H, W\) with C=8, got shape \(2, 8, 4, 4, 4\)"),
        (NonLocal(8, dims=3), torch.randn(2, 8, 4, 4), ValueError, r"expects input \(B, C, T, H, W\)"),
        (NonLocal(8, dims=1), torch.randn(2, 6, 5), ValueError, r"expects 8 input channels \(dim 1\), got 6"),
        (NonLocal(8, dims=2), torch.randn(2, 8, 4, 0), ValueError, "non-empty input"),
        (NonLocal(8, dims=2), torch.zeros(2, 8, 4, 4, dtype=torch.int32), TypeError, "floating-point input, got dtype torch.int32"),
        (NonLocal(8, dims=2, subsample=True), torch.randn(2, 8, 1, 4), ValueError, r"pools by \(2, 2\); expected position dims >= \(2, 2\), got \(1, 4\)"),
    ],
)
def test_bad_input_is_named(block: NonLocal, x: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        block(x)
    with pytest.raises(error, match=match):
        block.attention_map(x)

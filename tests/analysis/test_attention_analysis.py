import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gcnet.analysis.attention import attention_blocks, attention_maps
from gcnet.analysis.figures import markdown_table, plot_query_maps, plot_statistics, query_map
from gcnet.analysis.statistics import QueryStatistics, block_statistics, mean_cosine_distance, mean_js_divergence
from gcnet.blocks import GlobalContext, NonLocal, SimplifiedNonLocal, SqueezeExcite
from tests.blocks.reference import randomize_


def small_model(mode: str = "embedded_gaussian", subsample: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), NonLocal(8, mode=mode, subsample=subsample), GlobalContext(8, reduction=2), SqueezeExcite(8, 2)))


def test_captures_every_attention_block_without_changing_the_model() -> None:
    model = small_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    captures = attention_maps(model, x)
    assert list(captures) == ["1", "2"]  # the SE block has no attention map
    assert captures["1"].kind == "nl-embedded_gaussian" and captures["1"].maps.shape == (2, 36, 36)
    assert captures["2"].kind == "gc" and captures["2"].maps.shape == (2, 1, 36) and captures["2"].query_independent
    assert model.training and all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    features = model[0](x)
    torch.testing.assert_close(captures["1"].inputs, features)
    torch.testing.assert_close(captures["1"].outputs, model[1](features))
    torch.testing.assert_close(captures["1"].maps, model[1].attention_map(features))


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_every_mode_and_subsampling_gives_query_by_key_maps(mode: str) -> None:
    captures = attention_maps(small_model(mode, subsample=True), torch.randn(1, 3, 6, 4))
    assert captures["1"].maps.shape == (1, 24, 6) and captures["1"].key_shape == (3, 2)


def test_zero_theta_gives_the_same_map_for_every_query() -> None:
    block = randomize_(NonLocal(8, mode="embedded_gaussian")).eval()
    with torch.no_grad():
        block.theta.weight.zero_()
    capture = attention_maps(nn.Sequential(block), torch.randn(3, 8, 5, 5))["0"]
    stats = block_statistics(capture)
    assert stats["attention"].abs().max() < 1e-12 and stats["js"].abs().max() < 1e-12
    assert stats["input"].min() > 0.1  # the inputs themselves differ


def test_attending_to_the_own_position_gives_large_distances() -> None:
    # Gaussian NL on one-hot positions: f(x_i, x_j) = exp(100 [i == j]) puts each map on its query.
    N = 16
    x = (10 * torch.eye(N)).reshape(1, N, 4, 4)
    capture = attention_maps(nn.Sequential(NonLocal(N, mode="gaussian")), x)["0"]
    assert (capture.maps[0].argmax(-1) == torch.arange(N)).all()
    stats = block_statistics(capture)
    assert stats["attention"].item() > 0.99 and stats["js"].item() > 0.99 * math.log(2)


def test_statistics_agree_with_a_pairwise_loop() -> None:
    model = small_model("concatenation")
    capture = attention_maps(model, torch.randn(2, 3, 4, 3))["1"]
    stats = block_statistics(capture)
    for b in range(2):
        x = capture.inputs[b].flatten(1).T.double()
        delta = (capture.outputs[b] - capture.inputs[b]).flatten(1).T.double()
        maps = capture.maps[b].double()
        pairs = [(i, j) for i, j in itertools.product(range(12), repeat=2) if i != j]

        def cosine(v):
            return sum(1 - F.cosine_similarity(v[i], v[j], dim=0).item() for i, j in pairs) / len(pairs)

        def js(p, q):
            p, q = p / p.sum(), q / q.sum()
            m = (p + q) / 2
            kl = lambda a, c: sum(ai * math.log(ai / ci) for ai, ci in zip(a.tolist(), c.tolist()) if ai > 0)
            return (kl(p, m) + kl(q, m)) / 2

        assert stats["input"][b].item() == pytest.approx(cosine(x), abs=1e-9)
        assert stats["output"][b].item() == pytest.approx(cosine(delta), abs=1e-9)
        assert stats["attention"][b].item() == pytest.approx(cosine(maps), abs=1e-9)
        assert stats["js"][b].item() == pytest.approx(sum(js(maps[i], maps[j]) for i, j in pairs) / len(pairs), abs=1e-9)


def test_undefined_statistics_are_nan_not_numbers() -> None:
    assert math.isnan(mean_cosine_distance(torch.zeros(1, 3, 4))[0])
    assert math.isnan(mean_js_divergence(torch.tensor([[[0.5, -0.5], [1.0, 0.0]]]))[0])
    capture = attention_maps(small_model("dot_product"), torch.randn(1, 3, 4, 4))["1"]
    assert math.isnan(block_statistics(capture)["js"][0])


def test_js_chunks_give_the_same_mean() -> None:
    maps = torch.rand(2, 40, 9)
    torch.testing.assert_close(mean_js_divergence(maps, max_elements=2 * 40 * 9), mean_js_divergence(maps))


def test_gc_maps_are_query_independent_and_outputs_alike() -> None:
    capture = attention_maps(nn.Sequential(randomize_(SimplifiedNonLocal(8))), torch.randn(2, 8, 4, 4))["0"]
    torch.testing.assert_close(capture.maps.sum(-1), torch.ones(2, 1))
    stats = block_statistics(capture)
    assert stats["attention"].abs().max() == 0 and stats["output"].abs().max() < 1e-12


def test_running_means_over_batches() -> None:
    model = small_model()
    running = QueryStatistics()
    batches = [torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)]
    per_sample = []
    for x in batches:
        captures = attention_maps(model, x)
        running.update(captures)
        per_sample.append(block_statistics(captures["1"])["input"])
    summary = running.summary()
    assert summary["1"]["kind"] == "nl-embedded_gaussian"
    assert summary["1"]["input"] == pytest.approx(torch.cat(per_sample).mean().item())
    assert summary["2"]["attention"] == 0


def test_space_time_blocks_and_figures(tmp_path) -> None:
    model = nn.Sequential(nn.Conv3d(3, 8, 1), randomize_(NonLocal(8, dims=3, subsample=True)), randomize_(GlobalContext(8, 2)))
    clip = torch.rand(1, 3, 4, 6, 6)
    captures = attention_maps(model, clip)
    assert captures["1"].maps.shape == (1, 144, 36) and captures["1"].key_shape == (4, 3, 3)
    keys, (row, col) = query_map(captures["1"], 0, (0.5, 0.5))
    assert keys.shape == (3, 3) and (row, col) == (3, 3)
    # the middle frame's query; its weights summed over the 4 key frames: a whole distribution
    torch.testing.assert_close(keys.flatten(), captures["1"].maps[0, 2 * 36 + 3 * 6 + 3].reshape(4, 9).sum(0))
    assert keys.sum().item() == pytest.approx(1.0)
    figure = plot_query_maps(clip[0, :, 2], captures, tmp_path / "maps.png")
    running = QueryStatistics()
    running.update(captures)
    bars = plot_statistics(running.summary(), tmp_path / "stats.png")
    assert figure.stat().st_size > 5_000 and bars.stat().st_size > 5_000
    table = markdown_table(running.summary())
    assert table.count("\n") == 4 and "| 1 | nl-embedded_gaussian |" in table


def test_errors_name_what_is_available() -> None:
    with pytest.raises(ValueError, match="has no NonLocal or attention-pooling GlobalContext block"):
        attention_maps(nn.Sequential(nn.Conv2d(3, 3, 1), SqueezeExcite(3, 1)), torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"unknown blocks \['layer9'\]; this model's attention blocks are \['1', '2'\]"):
        attention_maps(small_model(), torch.randn(1, 3, 4, 4), blocks=["layer9"])
    assert list(attention_blocks(small_model())) == ["1", "2"]


def test_each_module_keeps_its_own_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), GlobalContext(8, reduction=2))
    model.train()
    model[1].eval()  # frozen BN inside a training model
    attention_maps(model, torch.randn(2, 3, 6, 6))
    assert [m.training for m in model.modules()] == [True, True, False, True] + [True] * (len(list(model.modules())) - 4)

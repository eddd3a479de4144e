"""The library on a CUDA device: blocks, models, training, torchrun, detection and the NL analysis.

CI has no GPU, so every test here is skipped there; run them where CUDA is present:
    python -m pytest tests/gpu -q
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import gcnet
from gcnet.analysis.attention import attention_maps
from gcnet.analysis.nl_to_gc import convert_nonlocal
from gcnet.blocks import GlobalContext, NonLocal, SimplifiedNonLocal, SqueezeExcite
from gcnet.builder import build_classifier, evaluate_checkpoint, train
from gcnet.config import Config, config_from_dict
from gcnet.engine import load_checkpoint
from gcnet.engine.metrics import read_csv
from tests.blocks.reference import randomize_
from tests.engine.tiny import image_config, make_image_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")

BLOCKS = {
    "gc": lambda d: GlobalContext(16, reduction=4),
    "gc-scale": lambda d: GlobalContext(16, reduction=4, fusion="scale"),
    "gc-both-average": lambda d: GlobalContext(16, reduction=4, pooling="average", fusion="both"),
    "gc-plain": lambda d: GlobalContext(16, reduction=None, norm=False, relu=False),
    "snl": lambda d: SimplifiedNonLocal(16),
    "se": lambda d: SqueezeExcite(16, reduction=4),
    **{f"nl-{mode}{'-sub' if sub else ''}": lambda d, m=mode, s=sub: NonLocal(16, mode=m, subsample=s, dims=d)
       for mode in ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
       for sub in (False, True)},
}
SHAPES = {1: (3, 16, 10), 2: (3, 16, 6, 8), 3: (2, 16, 4, 4, 6)}


def _grads(block: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    y = block(x)
    params = [p for p in block.parameters()]
    return (y, *torch.autograd.grad(y, (x, *params), grad_out))


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_blocks_on_cuda_match_cpu_in_float64(name: str, dims: int, train_mode: bool) -> None:
    cpu = randomize_(BLOCKS[name](dims)).double().train(train_mode)
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.randn(SHAPES[dims], dtype=torch.float64)
    grad_out = torch.randn_like(x)
    expected = _grads(cpu, x, grad_out)
    got = _grads(gpu, x.to(CUDA), grad_out.to(CUDA))
    for e, g in zip(expected, got):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), e, rtol=1e-9, atol=1e-10)
    for (key, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):  # BN running statistics
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-10, msg=key)


@pytest.mark.parametrize("name", ["gc", "snl", "nl-embedded_gaussian", "nl-embedded_gaussian-sub"])
def test_blocks_pass_gradcheck_on_cuda(name: str) -> None:
    block = randomize_(BLOCKS[name](2)).double().to(CUDA)
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64, device=CUDA, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_blocks_under_cuda_autocast_stay_close_to_float32(name: str, dtype: torch.dtype) -> None:
    block = BLOCKS[name](2).to(CUDA)
    for p in block.parameters():  # non-zero last layers, so every path carries signal
        nn.init.normal_(p, std=0.1)
    x = torch.randn(4, 16, 12, 12, device=CUDA, requires_grad=True)
    reference = block(x)
    with torch.autocast("cuda", dtype=dtype):
        y = block(x)
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in block.parameters())
    error = (y.float() - reference).norm() / reference.norm()
    assert error < (5e-3 if dtype == torch.float16 else 3e-2), float(error)


@pytest.fixture
def full_float32() -> Iterator[None]:
    """TF32 off for convolutions and matmuls (cuDNN's default is on), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.usefixtures("full_float32")
def test_resnet50_gc_on_cuda_matches_cpu_and_channels_last() -> None:
    model = gcnet.create_model("resnet50", context="gc", reduction=16, stages=(False, True, True, True),
                               num_classes=10)
    for name, p in model.named_parameters():  # GC's zero-initialised last layers: make the blocks count
        if "last" in name:
            nn.init.normal_(p, std=0.02)
    model.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(x)
        gpu = copy.deepcopy(model).to(CUDA)
        got = gpu(x.to(CUDA))
        channels_last = torch.channels_last
        last = gpu.to(memory_format=channels_last)(x.to(CUDA).contiguous(memory_format=channels_last))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(last, got, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", classes=3, per_class=8, size=12)


class Interrupt(Exception):
    """Stands in for a crash part-way through a run."""


def crashing_model(config: Config, after: int) -> nn.Module:
    """The configured model, raising Interrupt at its training forward number `after` + 1."""
    model = build_classifier(config, config.model.num_classes)
    forward, calls = model.forward, [0]

    def crash(x: torch.Tensor) -> torch.Tensor:
        if model.training:
            calls[0] += 1
            if calls[0] > after:
                raise Interrupt
        return forward(x)

    model.forward = crash
    return model


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler:UserWarning")  # GradScaler's skipped steps
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_training_on_cuda_resumes_and_its_checkpoint_evaluates_on_cpu(images: Path, tmp_path: Path,
                                                                       precision: str) -> None:
    options = {"name": "cifar_resnet20", "num_classes": 3, "context": {"block": "gc", "reduction": 4}}
    config = image_config(images, tmp_path / "straight", model=options, data={"test": str(images)},
                          train={"device": "cuda", "precision": precision, "checkpoint_every_steps": 1,
                                 "deterministic": True})
    straight = train(config_from_dict(config))  # 3 epochs of 3 steps
    assert len(straight.step_losses) == 9 and all(torch.isfinite(torch.tensor(straight.step_losses)))

    config["train"]["out_dir"] = str(tmp_path / "run")
    with pytest.raises(Interrupt):
        train(config_from_dict(config), model=lambda c: crashing_model(c, after=5))
    assert load_checkpoint(tmp_path / "run").state["step"] == 5
    resumed = train(config_from_dict(config), resume=True)
    losses = [float(r["loss"]) for r in read_csv(tmp_path / "run" / "steps.csv")]
    assert losses == straight.step_losses

    on_cpu = evaluate_checkpoint(tmp_path / "run", str(images), ["train.device=cpu"])
    assert on_cpu["samples"] == resumed.test["samples"] == 24
    assert on_cpu["loss"] == pytest.approx(resumed.test["loss"], rel=2e-2 if precision != "fp32" else 1e-3)


def test_gcnet_train_under_torchrun_on_cuda_matches_the_in_process_run(images: Path, tmp_path: Path) -> None:
    config = image_config(images, tmp_path / "torchrun", model={"name": "cifar_resnet20", "num_classes": 3},
                          train={"device": "cuda", "epochs": 2, "deterministic": True})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "gcnet.cli", "train", str(path)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    config["train"]["out_dir"] = str(tmp_path / "single")
    single = train(config_from_dict(config))
    losses = [float(r["loss"]) for r in read_csv(tmp_path / "torchrun" / "steps.csv")]
    assert losses == single.step_losses


def test_detection_train_step_and_evaluation_on_cuda(tmp_path: Path) -> None:
    from tests.detection.test_train import tiny_config

    data = tiny_config(tmp_path / "data", tmp_path / "run", device="cuda")
    result = train(config_from_dict(data))
    assert len(result.step_losses) == 2 and all(torch.isfinite(torch.tensor(result.step_losses)))
    assert result.val is not None and result.val["images"] == 4 and "bbox_AP" in result.val


def test_nl_analysis_and_conversion_on_cuda() -> None:
    model = gcnet.create_model("cifar_resnet20", num_classes=10, nonlocal_indices=((), (1,), (1,)))
    randomize_(model)
    model = model.to(CUDA).eval()
    x = torch.randn(4, 3, 32, 32, device=CUDA)
    captures = attention_maps(model, x)
    assert captures and all(c.maps.device.type == "cuda" for c in captures.values())

    block = randomize_(NonLocal(16, dims=2)).to(CUDA).eval()
    calibration = [torch.randn(4, 16, 6, 6, device=CUDA).relu() for _ in range(2)]
    converted, report = convert_nonlocal(block, calibration, steps=20)
    assert next(converted.parameters()).device.type == "cuda" and not converted.training
    assert 0 < report.kl_fitted < report.kl_uniform
    with torch.no_grad():
        assert torch.isfinite(converted(calibration[0])).all()


def test_model_benchmark_on_cuda_reports_time_and_peak_memory() -> None:
    from benchmarks import models

    result = models.main(["--quick", "--device", "cuda", "--composite"])
    assert result["device"] == "cuda" and len(result["rows"]) == len(models.MODELS) + 2
    assert all(row["train_ms"] > 0 and row["train_peak_mib"] > 0 for row in result["rows"])


def test_cuda_block_benchmark_reports_every_case() -> None:
    from benchmarks import cuda_blocks

    results = cuda_blocks.main(["--quick"])
    assert {r["suite"] for r in results} == {"gc", "nl"}
    for result in results:
        rows = result["rows"]
        assert all(row["fwd_ms"] > 0 and row["fb_ms"] > 0 and row["peak_fb_mib"] >= 0 for row in rows)
        assert result["max_abs_diff"] < 1e-3  # TF32 convolutions in some cases


def test_context_blocks_take_the_composite_ops_on_cuda() -> None:
    for block in (GlobalContext(16, reduction=4), SqueezeExcite(16, reduction=4)):
        x = torch.randn(4, 16, 4, 4, requires_grad=True)
        assert type(block(x).grad_fn).__name__ == "ContextFusionBackward"  # the CPU's fast path
        y = block.cuda()(x.detach().cuda().requires_grad_(True))
        assert type(y.grad_fn).__name__ != "ContextFusionBackward"

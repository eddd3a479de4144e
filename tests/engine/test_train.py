import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gcnet.blocks import NonLocal
from gcnet.data import CorruptFileError
from gcnet.builder import train
from gcnet.config import config_from_dict
from gcnet.engine import NonFiniteLossError, load_checkpoint
from gcnet.engine.metrics import read_csv
from tests.engine.tiny import TinyNet, TinyVideoNet, image_config, make_image_folder


class Interrupt(Exception):
    """Stands in for a crash part-way through a run."""


class CrashAfter(TinyNet):
    """TinyNet that raises after `steps` training forwards (a run cut short)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.remaining = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.remaining == 0:
                raise Interrupt
            self.remaining -= 1
        return super().forward(x)


class NanAfter(TinyNet):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.calls = 0
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > self.steps:
                return out * float("nan")
        return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", classes=3, per_class=8, size=12)


def test_epoch_on_generated_image_folder(images: Path, tmp_path: Path) -> None:
    config = config_from_dict(image_config(images, tmp_path / "run", data={"test": str(images)},
                                           train={"plot": True, "tensorboard": True}))
    result = train(config, model=TinyNet())
    assert len(result.step_losses) == 3 * 3  # 18 train images, batch 6, 3 epochs
    assert result.step_losses[-1] < result.step_losses[0]
    assert result.val is not None and result.val["samples"] == 6 and 0 <= result.val["top1"] <= 100
    assert result.test is not None and result.test["samples"] == 24 and result.test["top5"] == 100.0
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and float(rows[0]["images_per_s"]) > 0
    for name in ("curves.png", "summary.json", "steps.csv", "config.json", "checkpoints/last.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert list((tmp_path / "run" / "tb").iterdir())
    ckpt = load_checkpoint(tmp_path / "run")  # state.pt is read with weights_only=True
    assert ckpt.state["epoch"] == 3 and ckpt.state["step"] == 9 and set(ckpt.model) == set(TinyNet().state_dict())
    assert torch.load(ckpt.path / "state.pt", weights_only=True)["config"]["train"]["seed"] == 1
    assert set(load_file(ckpt.path / "model.safetensors")) == set(TinyNet().state_dict())
    with pytest.raises(ValueError, match="--resume"):
        train(config, model=TinyNet())  # a second fresh run would overwrite the checkpoints


def test_options_bf16_channels_last_adamw_step_clip_smoothing(images: Path, tmp_path: Path) -> None:
    config = config_from_dict(image_config(
        images, tmp_path / "run", optim={"name": "adamw", "lr": 0.01, "weight_decay": 0.05, "grad_clip_norm": 1.0},
        schedule={"name": "step", "milestones": [1], "warmup_epochs": 0},
        model={"name": "cifar_resnet20", "num_classes": 3, "channels_last": True},
        train={"epochs": 2, "precision": "bf16", "label_smoothing": 0.1},
    ))
    result = train(config, model=TinyNet())
    assert len(result.step_losses) == 6 and all(torch.isfinite(torch.tensor(result.step_losses)))
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "run" / "steps.csv")]
    assert lrs[:3] == pytest.approx([0.01] * 3) and lrs[3:] == pytest.approx([0.001] * 3)


@pytest.mark.parametrize(("crash_after", "every"), [(4, 0), (5, 2)], ids=["epoch-checkpoint", "mid-epoch"])
def test_resume_gives_the_same_losses(images: Path, tmp_path: Path, crash_after: int, every: int) -> None:
    sections = {"train": {"epochs": 3, "checkpoint_every_steps": every}}
    # Factories build the model after train() seeds the RNG, so both runs start from the same weights.
    reference = train(config_from_dict(image_config(images, tmp_path / "a", **sections)),
                      model=lambda c: TinyNet())

    interrupted = config_from_dict(image_config(images, tmp_path / "b", **sections))
    with pytest.raises(Interrupt):
        train(interrupted, model=lambda c: CrashAfter(crash_after))
    saved_step = load_checkpoint(tmp_path / "b").state["step"]
    assert saved_step == (3 if every == 0 else 4)
    resumed = train(interrupted, resume=True, model=lambda c: TinyNet())

    assert resumed.step_losses == reference.step_losses[saved_step:]  # bit-identical on CPU
    losses = [float(r["loss"]) for r in read_csv(tmp_path / "b" / "steps.csv")]
    assert losses == reference.step_losses
    final_a, final_b = load_checkpoint(tmp_path / "a").model, load_checkpoint(tmp_path / "b").model
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    for a, b in zip(read_csv(tmp_path / "a" / "metrics.csv"), read_csv(tmp_path / "b" / "metrics.csv"), strict=True):
        # the resumed epoch's metrics cover the whole epoch, not the steps after the checkpoint
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-12)
        assert a["train_top1"] == b["train_top1"] and a["val_top1"] == b["val_top1"]

    summary = (tmp_path / "b" / "summary.json").read_text()
    again = train(interrupted, resume=True, model=lambda c: TinyNet())  # a finished run: nothing to do
    assert (tmp_path / "b" / "summary.json").read_text() == summary
    assert again.val is not None and again.val["top1"] == resumed.val["top1"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(images: Path, tmp_path: Path) -> None:
    config = config_from_dict(image_config(images, tmp_path / "run"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 5.*Last good checkpoint: .*step-000000003"):
        train(config, model=NanAfter(steps=4))
    pointer = json.loads((tmp_path / "run" / "checkpoints" / "last.json").read_text())
    assert pointer["step"] == 3
    ckpt = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())


def test_corrupt_file_skipped_and_counted_or_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_image_folder(tmp_path / "images", classes=3, per_class=4, size=12)
    bad = root / "class_2" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = config_from_dict(image_config(root, tmp_path / "run", data={"val_fraction": 0.0, "batch_size": 13},
                                           train={"epochs": 1}))
    with caplog.at_level(logging.WARNING):
        result = train(config, model=TinyNet())
    assert result.skipped == [str(bad)]
    assert str(bad) in caplog.text
    assert read_csv(tmp_path / "run" / "metrics.csv")[0]["skipped"] == "1"
    fatal = config_from_dict(image_config(root, tmp_path / "run2", data={"val_fraction": 0.0, "batch_size": 13,
                                                                         "on_corrupt": "error"}, train={"epochs": 1}))
    with pytest.raises(CorruptFileError, match="broken.jpg"):
        train(fatal, model=TinyNet())


def test_epoch_on_generated_video_clips(tmp_path: Path) -> None:
    pytest.importorskip("av")
    from tests.data.clips import make_clip_folder

    root = make_clip_folder(tmp_path / "clips", classes=2, per_class=3)
    config = config_from_dict({
        "task": "video",
        "model": {"name": "c2d_resnet50", "num_classes": 2},
        "data": {"train": str(root), "val": str(root), "clip_len": 4, "frame_stride": 2,
                 "eval_clips": 2, "image_size": 16, "resize": 20, "batch_size": 3, "mean": [0.5] * 3,
                 "std": [0.25] * 3},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1, "out_dir": str(tmp_path / "run"), "progress": False, "plot": False},
    })
    result = train(config, model=TinyVideoNet(2))
    assert len(result.step_losses) == 2 and result.val is not None and result.val["samples"] == 6


def test_cli_train_and_eval_with_registered_model(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("gcnet.models")
    import yaml

    from gcnet.cli import main

    config = image_config(images, tmp_path / "run", model={"name": "cifar_resnet20", "num_classes": 3,
                                                           "context": {"block": "gc", "reduction": 4}},
                          train={"epochs": 1})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--set", "data.test=" + str(images)]) == 0
    assert main(["train", str(path), "--set", "optim.nam=sgd"]) == 2
    assert "unknown config key 'optim.nam'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run"), "--data", str(images)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["samples"] == 24 and metrics["step"] == 3


def test_a_run_trained_on_cuda_in_fp16_evaluates_on_a_cpu_only_machine(
        images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gcnet.builder import evaluate_checkpoint

    train(config_from_dict(image_config(images, tmp_path / "run", train={"epochs": 1})), model=TinyNet())
    reference = evaluate_checkpoint(tmp_path / "run", str(images), ["train.device=cpu"], model=TinyNet())
    state_path = load_checkpoint(tmp_path / "run").path / "state.pt"
    state = torch.load(state_path, weights_only=True)
    state["config"]["train"].update(device="cuda", precision="fp16")  # as saved by a GPU run
    torch.save(state, state_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert evaluate_checkpoint(tmp_path / "run", str(images), model=TinyNet()) == reference
    with pytest.raises(ValueError, match="CUDA is not available"):  # asked for explicitly: kept
        evaluate_checkpoint(tmp_path / "run", str(images), ["train.device=cuda"], model=TinyNet())
    with pytest.raises(ValueError, match="'fp16' needs CUDA"):
        evaluate_checkpoint(tmp_path / "run", str(images), ["train.device=cpu", "train.precision=fp16"],
                            model=TinyNet())


class NonLocalNet(TinyNet):
    """TinyNet with a non-local block after its first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.nl = NonLocal(8, dims=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.nl(self.bn1(self.conv1(x)).relu())
        return self.fc(self.bn2(self.conv2(x)).relu().mean(dim=(2, 3)))


def test_deterministic_run_repeats_and_restores_the_callers_setting(
    images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = image_config(images, tmp_path / "a", train={"epochs": 1, "deterministic": True})
    with caplog.at_level(logging.INFO):
        first = train(config_from_dict(config), model=lambda c: NonLocalNet())
    # The log names the non-local blocks' product path; a timed choice would not be repeatable.
    assert "non-local blocks' float32 products: MKL (deterministic algorithms: not timed)" in caplog.text
    assert not torch.are_deterministic_algorithms_enabled()
    config["train"]["out_dir"] = str(tmp_path / "b")
    assert train(config_from_dict(config), model=lambda c: NonLocalNet()).step_losses == first.step_losses


class InfiniteStatistics(TinyNet):
    """TinyNet whose BN running variance turns infinite after `steps` training forwards; the loss stays finite."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.remaining = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.remaining -= 1
            if self.remaining < 0:
                self.bn2.running_var.fill_(float("inf"))
        return super().forward(x)


def test_non_finite_statistics_stop_the_run_before_they_are_saved(images: Path, tmp_path: Path) -> None:
    config = config_from_dict(image_config(images, tmp_path / "run"))
    with pytest.raises(NonFiniteLossError, match=r"not finite after step 6 \(\['bn2.running_var'\]\).*step-000000003"):
        train(config, model=InfiniteStatistics(steps=4))
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.state["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())


def test_resume_applies_a_longer_run_and_refuses_changed_optimisation(images: Path, tmp_path: Path) -> None:
    short = image_config(images, tmp_path / "run", train={"epochs": 1}, schedule={"warmup_epochs": 0})
    train(config_from_dict(short), model=lambda c: TinyNet())
    with pytest.raises(ValueError, match=r"the config changes optim.lr \(0.05 -> 0.01\), which a resumed run cannot"):
        train(config_from_dict({**short, "optim": {**short["optim"], "lr": 0.01}}), resume=True,
              model=lambda c: TinyNet())
    other_model = {**short, "model": {**short["model"], "context": {"block": "se", "reduction": 2}}}
    with pytest.raises(ValueError, match=r"changes model.context \(\{.*'block': None.*\} -> \{.*'block': 'se'"):
        train(config_from_dict(other_model), resume=True, model=lambda c: TinyNet())
    longer = {**short, "train": {**short["train"], "epochs": 2}}
    resumed = train(config_from_dict(longer), resume=True, model=lambda c: TinyNet())
    assert len(resumed.step_losses) == 3 and load_checkpoint(tmp_path / "run").state["epoch"] == 2
    train(config_from_dict({**longer, "train": {**longer["train"], "out_dir": str(tmp_path / "ref")}}),
                      model=lambda c: TinyNet())
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "run" / "steps.csv")]
    assert lrs[3:] == [float(r["lr"]) for r in read_csv(tmp_path / "ref" / "steps.csv")][3:]  # the new schedule
    assert lrs[:3] != [float(r["lr"]) for r in read_csv(tmp_path / "ref" / "steps.csv")][:3]


def test_an_occupied_out_dir_is_refused_unless_overwritten(images: Path, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("epoch,step\n1,3\n")  # an earlier run without checkpoints
    config = config_from_dict(image_config(images, out, train={"epochs": 1}))
    with pytest.raises(ValueError, match=r"holds an earlier run \(\['metrics.csv'\]\); pass --overwrite"):
        train(config, model=TinyNet())
    with open(out / ".lock", "a+") as other:  # another run holds the folder
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242\n")
        other.flush()
        with pytest.raises(ValueError, match=r"in use by another run \(process 4242\)"):
            train(config, model=TinyNet(), overwrite=True)
    train(config, model=TinyNet(), overwrite=True)
    assert len(read_csv(out / "metrics.csv")) == 1 and (out / "checkpoints" / "last.json").is_file()
    under_a_file = config_from_dict(image_config(images, out / "metrics.csv" / "run"))
    with pytest.raises(ValueError, match=r"metrics.csv' is a file, not a folder"):
        train(under_a_file, model=TinyNet())


def test_rewriting_a_log_on_resume_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    from gcnet.engine.metrics import CsvLog

    path = tmp_path / "steps.csv"
    log = CsvLog(path, ["step", "loss"])
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    before = path.read_text()

    def killed(self: csv.DictWriter, rows: object) -> None:
        raise KeyboardInterrupt  # the process dies while the kept rows are being written

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        CsvLog(path, ["step", "loss"], keep_until_step=3)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["steps.csv"]
    monkeypatch.undo()
    CsvLog(path, ["step", "loss"], keep_until_step=3).close()
    assert [r["step"] for r in read_csv(path)] == ["1", "2", "3"]


def test_cli_reports_a_corrupt_file_under_on_corrupt_error_in_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    import yaml

    from gcnet.cli import main

    root = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=12)
    (root / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = image_config(root, tmp_path / "run", data={"val_fraction": 0.0, "batch_size": 7, "on_corrupt": "error"},
                          train={"epochs": 1})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gcnet train: corrupt or unreadable file ") and "broken.jpg" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_schema_key_added_since_the_checkpoint_is_no_change() -> None:
    """A run saved before `model.context.norm_eps` (and other keys) existed resumes: the saved config
    is read with today's schema, so a new key at its default does not count as changed."""
    from gcnet.engine.loop import config_changes

    today = config_from_dict({"data": {"train": "/nonexistent/train"}}).to_dict()
    saved = copy.deepcopy(today)
    for section in ("context", "nonlocal_blocks"):
        for key in ("hidden_channels", "norm_eps", "subsample_at"):
            del saved["model"][section][key]
    assert config_changes(saved, today) == {}
    saved["model"]["context"]["block"] = "gc"
    assert set(config_changes(saved, today)) == {"model.context"}

"""The one config schema: every task, every hostile value, the same clear error before any data is read."""

from pathlib import Path

import pytest
import torch

from gcnet.cli import main
from gcnet.config import (
    BUNDLED_CONFIGS,
    Config,
    ConfigError,
    apply_overrides,
    bundled_configs,
    config_from_dict,
    load_config,
    read_config_data,
)

# Data paths that do not exist: every error below must come from the config, not from reading data.
BASE = {
    "image": {"task": "image", "model": {"name": "cifar_resnet20"}, "data": {"train": "/nonexistent/train"}},
    "video": {"task": "video", "model": {"name": "c2d_resnet50"}, "data": {"train": "/nonexistent/list.txt"}},
    "detection": {"task": "detection", "model": {"name": "resnet18"},
                  "data": {"train": "/nonexistent/images", "train_annotations": "/nonexistent/a.json"}},
}
HOSTILE = [
    ("optim.lr=-0.1", r"config key 'optim.lr': expected a value > 0, got -0.1"),
    ("optim.weight_decay=-1", r"config key 'optim.weight_decay': expected a value >= 0, got -1.0"),
    ("optim.grad_clip_norm=-5", r"config key 'optim.grad_clip_norm': expected a value > 0 or null, got -5.0"),
    ("schedule.warmup_epochs=-2", r"config key 'schedule.warmup_epochs': expected a value >= 0, got -2.0"),
    ("schedule.gamma=-0.1", r"config key 'schedule.gamma': expected a value > 0, got -0.1"),
    ("train.epochs=0", r"config key 'train.epochs': expected an integer >= 1, got 0"),
    ("data.batch_size=-4", r"config key 'data.batch_size': expected an integer >= 1, got -4"),
    ("optim.lr=.nan", r"config key 'optim.lr': expected a finite number, got nan"),
    ("optim.nam=sgd", r"unknown config key 'optim.nam'; allowed keys in 'optim': \['name', 'lr'"),
    ("model.context.reductoin=4", r"unknown config key 'model.context.reductoin'; allowed keys in 'model.context'"),
    ("model.context=gx", r"config key 'model.context.block': expected one of \['gc', 'snl', 'se', 'nl'\] or null"),
    ("model.context.mode=dot_product", r"config key 'model.context.mode': block 'gc' has no option 'mode'; "
                                       r"its options are \['reduction', 'pooling', 'fusion', 'norm', 'relu', "
                                       r"'hidden_channels', 'norm_eps'\]"),
]


def _write(tmp_path: Path, data: dict) -> Path:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("override,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_every_task_rejects_the_same_hostile_value_the_same_way(tmp_path: Path, override: str, message: str) -> None:
    errors = set()
    for task, base in BASE.items():
        overrides = [override]
        if "context.mode" in override:
            overrides.insert(0, "model.context.block=gc")
        with pytest.raises(ConfigError, match=message) as raised:
            load_config(_write(tmp_path, base), overrides)
        errors.add(str(raised.value).split(": ", 1)[1])
    assert len(errors) == 1, errors


def test_the_command_line_names_the_command_and_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path, BASE["detection"])
    assert main(["train", str(path), "--set", "optim.weight_decay=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gcnet train: ") and "'optim.weight_decay'" in err and "nonexistent" not in err.split(":", 2)[2]


def test_defaults_round_trip_and_task_defaults() -> None:
    config = config_from_dict({"data": {"train": "x"}})
    assert config.task == "image" and config.optim.lr == 0.1 and config.data.mean == (0.4914, 0.4822, 0.4465)
    assert config_from_dict(config.to_dict()) == config
    detection = config_from_dict(BASE["detection"])
    assert detection.optim.lr == 0.02 and detection.schedule.milestones == (8, 11) and detection.train.epochs == 12
    assert config_from_dict(detection.to_dict()) == detection


def test_keys_of_another_task_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"'data.clip_len' applies to task video, not 'detection'"):
        config_from_dict({**BASE["detection"], "data": {**BASE["detection"]["data"], "clip_len": 8}})
    with pytest.raises(ConfigError, match=r"'model.detector' applies to task detection, not 'image'"):
        config_from_dict({**BASE["image"], "model": {"name": "cifar_resnet20", "detector": {"fpn_channels": 8}}})
    with pytest.raises(ConfigError, match=r"'data.val' and 'data.val_annotations' go together"):
        config_from_dict({**BASE["detection"], "data": {**BASE["detection"]["data"], "val": "x"}})


def test_block_options_are_checked_against_the_block_and_the_preset() -> None:
    config = config_from_dict({**BASE["image"], "model": {"name": "cifar_resnet20", "context": "gc"}})
    assert config.model.context.block == "gc"
    preset = config_from_dict({**BASE["image"], "model": {"name": "resnet50_gc_r16", "context": {"reduction": 4}}})
    assert preset.model.context.reduction == 4  # the named model's GC block takes it
    with pytest.raises(ConfigError, match=r"'model.context' names no block"):
        config_from_dict({**BASE["image"], "model": {"name": "resnet50", "context": {"reduction": 4}}})
    with pytest.raises(ConfigError, match=r"'model.nonlocal_blocks.pooling': block 'nl' has no option 'pooling'"):
        config_from_dict({**BASE["image"], "model": {"nonlocal_blocks": {"indices": [[], [1], []], "pooling": "average"}}})
    with pytest.raises(ConfigError, match=r"without 'model.nonlocal_blocks.indices'"):
        config_from_dict({**BASE["image"], "model": {"nonlocal_blocks": {"mode": "gaussian"}}})
    with pytest.raises(ConfigError, match=r"unknown model 'resnet5'; did you mean"):
        config_from_dict({**BASE["image"], "model": {"name": "resnet5"}})
    with pytest.raises(ConfigError, match=r"detection needs a ResNet/ResNeXt backbone"):
        config_from_dict({**BASE["detection"], "model": {"name": "cifar_resnet20"}})


def test_overrides_and_numbers_as_users_write_them(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x\noptim:\n  lr: 1e-3\n  weight_decay: 5e-4\n")
    config = load_config(path, ["schedule.milestones=[3, 6]", "model.context=gc", "model.context.reduction=4"])
    assert config.optim.lr == 1e-3 and config.optim.weight_decay == 5e-4 and config.schedule.milestones == (3, 6)
    assert config.model.context.block == "gc" and config.model.context.reduction == 4
    with pytest.raises(ConfigError, match=r"'train.max_steps_per_epoch': expected int or null, got float 100.0"):
        load_config(path, ["train.max_steps_per_epoch=1e2"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"--set optim.betas: not a YAML value"):
        apply_overrides({}, ["optim.betas=[0.9, 0.99"])


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    cases = {"syntax.yaml": "data:\n  train: [x\n", "tab.yaml": "data:\n\ttrain: x\n", "list.yaml": "- a\n- b\n",
             "string.yaml": "just words\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=name):
            read_config_data(tmp_path / name)
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ConfigError, match="binary.yaml"):
        read_config_data(tmp_path / "binary.yaml")
    with pytest.raises(ConfigError, match=r"'nowhere.yaml' does not exist and is not one of gcnet's configs"):
        read_config_data("nowhere.yaml")


@pytest.mark.parametrize("name", bundled_configs())
def test_shipped_configs_load_by_name_and_by_path(name: str) -> None:
    assert isinstance(load_config(name), Config)
    assert load_config(BUNDLED_CONFIGS / f"{name}.yaml") == load_config(name)


def test_video_layout_reaches_the_model_and_is_refused_where_it_does_not_apply() -> None:
    from gcnet.builder import build_model

    config = config_from_dict({**BASE["video"], "model": {"name": "c2d_resnet50", "layout": "paper",
                                                          "stem_pool_padding": 0, "num_classes": 3}})
    with torch.device("meta"):
        model = build_model(config)
    assert model.layout == "paper" and model.maxpool.padding == (0, 0, 0) and model.conv1.stride[0] == 2
    with pytest.raises(ConfigError, match=r"'model.layout': model 'slowonly_resnet50' has no such option"):
        config_from_dict({**BASE["video"], "model": {"name": "slowonly_resnet50", "layout": "8x8"}})
    with pytest.raises(ConfigError, match=r"'model.layout' applies to task video, not 'image'"):
        config_from_dict({**BASE["image"], "model": {"name": "cifar_resnet20", "layout": "8x8"}})
    with pytest.raises(ConfigError, match=r"'model.stem_pool_padding': expected 0, 1 or null, got 2"):
        config_from_dict({**BASE["video"], "model": {"name": "c2d_resnet50", "stem_pool_padding": 2}})


def test_train_allocator_choice() -> None:
    from gcnet._machine import preloaded_allocator, retain_freed_memory

    assert config_from_dict(BASE["image"]).train.allocator == "retained"
    with pytest.raises(ConfigError, match=r"'train.allocator': expected one of \['retained', 'system'\]"):
        config_from_dict({**BASE["image"], "train": {"allocator": "jemalloc"}})
    import os

    preloaded = os.environ.get("LD_PRELOAD", "")
    assert preloaded_allocator() == next((n for n in ("jemalloc", "tcmalloc") if n in preloaded), None)
    assert retain_freed_memory() is True  # glibc (Debian): mallopt accepted

from pathlib import Path

import pytest

from gcnet.engine.config import Config, apply_overrides, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_defaults_and_round_trip() -> None:
    config = config_from_dict({"data": {"train": "x"}})
    assert config.optim.name == "sgd" and config.data.mean == (0.4914, 0.4822, 0.4465)
    assert config_from_dict(config.to_dict()) == config


def test_unknown_key_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'; allowed keys in 'optim': \[.*'lr'"):
        config_from_dict({"data": {"train": "x"}, "optim": {"lrr": 0.1}})
    with pytest.raises(ValueError, match=r"unknown config key 'trian'.*\['model', 'data', 'optim', 'schedule', 'train'\]"):
        config_from_dict({"trian": {}})


def test_bad_choice_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"'optim.name': expected one of \['sgd', 'adamw'\], got 'adam'"):
        config_from_dict({"data": {"train": "x"}, "optim": {"name": "adam"}})


def test_wrong_type_names_key_and_type() -> None:
    with pytest.raises(TypeError, match=r"'train.epochs': expected int, got str 'ten'"):
        config_from_dict({"data": {"train": "x"}, "train": {"epochs": "ten"}})
    with pytest.raises(TypeError, match=r"'data.mean'"):
        config_from_dict({"data": {"train": "x", "mean": 0.5}})
    with pytest.raises(ValueError, match=r"'optim.lr': expected a value > 0"):
        config_from_dict({"data": {"train": "x"}, "optim": {"lr": -1}})


def test_set_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x\noptim:\n  lr: 0.1\n")
    config = load_config(path, ["optim.lr=0.05", "schedule.milestones=[3, 6]", "model.context=gc",
                                'model.options={"reduction": 4}'])
    assert config.optim.lr == 0.05 and config.schedule.milestones == (3, 6)
    assert config.model.context == "gc" and config.model.options == {"reduction": 4}
    with pytest.raises(ValueError, match="'train.epoch'"):
        load_config(path, ["train.epoch=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["train.epochs"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)

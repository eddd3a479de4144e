import json
from pathlib import Path

import pytest
import torch

from gcnet.engine.checkpoint import load_checkpoint, resolve_checkpoint, rng_state, save_checkpoint, set_rng_state
from tests.engine.tiny import TinyNet


def test_save_load_and_pointers(tmp_path: Path) -> None:
    model = TinyNet()
    first = save_checkpoint(tmp_path, model, {"epoch": 1, "step": 10, "note": [1, 2]}, ("last", "best"))
    second = save_checkpoint(tmp_path, model, {"epoch": 2, "step": 20}, ("last",))
    assert resolve_checkpoint(tmp_path) == second and resolve_checkpoint(tmp_path, "best") == first
    assert resolve_checkpoint(tmp_path / "checkpoints" / "best.json") == first
    ckpt = load_checkpoint(first)
    assert ckpt.state["note"] == [1, 2] and all(torch.equal(ckpt.model[k], v) for k, v in model.state_dict().items())
    third = save_checkpoint(tmp_path, model, {"epoch": 3, "step": 30}, ("last", "best"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.json", "last.json", third.name]


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path, TinyNet(), {"epoch": 1, "step": 5})
    root = tmp_path / "checkpoints"
    # What a kill leaves behind: a half-written temporary folder and a renamed folder no pointer names.
    (root / ".tmp-step-000000006-deadbeef").mkdir()
    (root / ".tmp-step-000000006-deadbeef" / "model.safetensors").write_bytes(b"\x00" * 7)
    (root / "step-000000006-cafecafe").mkdir()
    assert load_checkpoint(tmp_path).path == good
    save_checkpoint(tmp_path, TinyNet(), {"epoch": 2, "step": 10})
    assert not (root / ".tmp-step-000000006-deadbeef").exists() and not (root / "step-000000006-cafecafe").exists()
    assert json.loads((root / "last.json").read_text())["step"] == 10


def test_missing_checkpoint_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no checkpoint at"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="unknown checkpoint pointer 'first'"):
        save_checkpoint(tmp_path, TinyNet(), {"step": 1}, ("first",))


def test_rng_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_truncated_or_corrupt_checkpoint_files_are_named(tmp_path: Path) -> None:
    import json as json_module
    import pickle

    from torch import nn

    folder = save_checkpoint(tmp_path, nn.Linear(3, 2), {"epoch": 1, "step": 4})
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors' cannot be read .*truncated"):
        load_checkpoint(tmp_path)
    (folder / "model.safetensors").write_bytes(weights)
    state = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(state[: len(state) // 3])
    with pytest.raises(ValueError, match=r"state.pt' cannot be read"):
        load_checkpoint(tmp_path)
    (folder / "state.pt").write_bytes(pickle.dumps({"format_version": 1, "evil": print}, protocol=2))
    with pytest.raises(ValueError, match=r"state.pt' cannot be read"):  # not unpickled: weights_only
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "last.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"last.json' is corrupt"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "last.json").write_text(json_module.dumps({"dir": "../../etc"}))
    with pytest.raises(ValueError, match=r"names '../../etc', not a checkpoint folder"):
        load_checkpoint(tmp_path)

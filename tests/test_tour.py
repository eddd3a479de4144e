from pathlib import Path

import pytest
import torch
from PIL import Image

from gcnet.cli import main
from gcnet.tour import run_tour


def test_tour_prints_every_block_and_saves_the_picture(tmp_path: Path, capsys) -> None:
    image = tmp_path / "image.png"
    Image.fromarray(torch.randint(0, 255, (20, 24, 3), dtype=torch.uint8).numpy()).save(image)
    assert main(["tour", "--out", str(tmp_path / "out"), "--image", str(image)]) == 0
    printed = capsys.readouterr().out
    for name in ["GC (r16, add)", "SNL", "SE (r16)", "NL concatenation"]:
        assert name in printed
    assert (tmp_path / "out" / "attention_maps.png").stat().st_size > 10_000


def test_tour_names_a_missing_image(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image not found: .*missing.jpg"):
        run_tour(tmp_path, image=tmp_path / "missing.jpg")

"""Generated COCO data for the detection tests: a few small JPEGs with rectangles, polygons and one RLE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]
COLORS = {3: (230, 30, 30), 7: (30, 200, 40)}


def make_coco(
    root: Path, images: int = 4, size: tuple[int, int] = (64, 80), seed: int = 0
) -> tuple[Path, Path]:
    """Write `images` JPEGs (two coloured rectangles each) and instances.json; return (image dir, json)."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    height, width = size
    records: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, images + 1):
        h, w = (height, width) if image_id % 2 else (width, height)  # two aspect-ratio groups
        pixels = np.full((h, w, 3), 90, dtype=np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
        for k, category in enumerate((3, 7)):
            bw, bh = int(rng.integers(12, 24)), int(rng.integers(12, 24))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y : y + bh, x : x + bw] = COLORS[category]
            if image_id == 1 and k == 1:  # one compressed RLE mask
                binary = np.zeros((h, w), dtype=np.uint8)
                binary[y : y + bh, x : x + bw] = 1
                rle = mask_utils.encode(np.asfortranarray(binary))
                segmentation: Any = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            else:
                segmentation = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, bw, bh],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
        name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(image_dir / name, quality=95)
        records.append({"id": image_id, "file_name": name, "height": h, "width": w})
    json_path = root / "annotations" / "instances.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps({"images": records, "annotations": annotations, "categories": CATEGORIES})
    )
    return image_dir, json_path


def load(json_path: Path) -> dict[str, Any]:
    """The json as a dict (to corrupt in a test)."""
    return json.loads(json_path.read_text())

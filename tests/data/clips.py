"""Tiny video clips written with PyAV for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_clip(path: Path, frames: int = 12, size: int = 32, colour: int = 0, fps: int = 8,
               faststart: bool = False) -> Path:
    """An MPEG-4 clip whose frames are a moving bright bar on a tinted background.

    `faststart` puts the index first (as streamed files have it), so a truncated copy still opens.
    """
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            image = np.full((size, size, 3), 40, dtype=np.uint8)
            image[..., colour % 3] = 180
            image[:, (t * 3) % size : (t * 3) % size + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_clip_folder(root: Path, classes: int = 2, per_class: int = 3, frames: int = 12) -> Path:
    """`root/<class>/<n>.mp4` with a class-specific tint."""
    for label in range(classes):
        for i in range(per_class):
            write_clip(root / f"class_{label}" / f"{i:02d}.mp4", frames=frames + i, colour=label)
    return root


def truncate(path: Path, keep: float = 0.4) -> Path:
    """Cut a file to `keep` of its bytes (a broken download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path

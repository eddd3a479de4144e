"""Video clips decoded with PyAV: `<root>/<class>/<clip>.mp4` folders or `path label` list files.

A clip is T frames taken every s frames, (C, T, H, W). Training samples one clip at a random start;
evaluation takes K clips at evenly spaced starts, (K, C, T, H, W), whose scores the evaluator averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from gcnet.data.errors import CorruptFileError, OnCorrupt, Skipped, check_on_corrupt, handle_corrupt
from gcnet.data.image import scan_folder

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif", ".m4v")


def read_list_file(path: str | Path) -> list[tuple[str, int]]:
    """(path, label) pairs of a list file with lines `relative/or/absolute/path label`.

    Relative paths are taken from the list file's folder; blank lines and `#` comments are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video list file {str(path)!r} does not exist")
    samples: list[tuple[str, int]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ValueError(f"{path}:{number}: expected 'path label' with an integer label >= 0, got {line!r}")
        file = Path(parts[0])
        samples.append((str(file if file.is_absolute() else path.parent / file), int(parts[1])))
    if not samples:
        raise ValueError(f"video list file {str(path)!r} lists no clips")
    return samples


def video_samples(source: str | Path, per_class: int | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) from a clip folder or a list file (classes are then "0", "1", ...)."""
    source = Path(source)
    if source.is_dir():
        return scan_folder(source, VIDEO_EXTENSIONS, per_class)
    samples = read_list_file(source)
    if per_class is not None:
        counts: dict[int, int] = {}
        kept = []
        for item in samples:
            counts[item[1]] = counts.get(item[1], 0) + 1
            if counts[item[1]] <= per_class:
                kept.append(item)
        samples = kept
    return [str(i) for i in range(max(label for _, label in samples) + 1)], samples


def decode_video(path: str, short_side: int | None = None) -> Tensor:
    """Every frame of the first video stream as uint8 (T, 3, H, W); failures name the path."""
    import av  # PyAV is only needed for video

    frames = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise CorruptFileError(path, "no video stream")
            stream = container.streams.video[0]
            expected = stream.frames  # from the container's index; 0 where it does not say
            for frame in container.decode(stream):
                width, height = frame.width, frame.height
                if short_side is not None:
                    scale = short_side / min(width, height)
                    width, height = max(round(width * scale), 1), max(round(height * scale), 1)
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24", width=width, height=height)))
    except CorruptFileError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as error:
        raise CorruptFileError(path, f"{type(error).__name__}: {error}") from error
    if not frames:
        raise CorruptFileError(path, "no decodable frames")
    if expected and len(frames) < expected:
        raise CorruptFileError(path, f"decoded {len(frames)} of its {expected} frames: the file is truncated or damaged")
    return torch.stack(frames).permute(0, 3, 1, 2).contiguous()  # (T, H, W, 3) -> (T, 3, H, W)


def clip_starts(num_frames: int, clip_len: int, stride: int, num_clips: int, train: bool) -> list[int]:
    """First frame of each clip: one random start when training, `num_clips` evenly spaced otherwise."""
    last_start = max(num_frames - ((clip_len - 1) * stride + 1), 0)
    if train:
        return [int(torch.randint(last_start + 1, ()).item())]
    if num_clips == 1:
        return [last_start // 2]
    return [round(i * last_start / (num_clips - 1)) for i in range(num_clips)]


def clip_indices(start: int, num_frames: int, clip_len: int, stride: int) -> Tensor:
    """Frame indices of one clip; short videos loop around."""
    return (start + torch.arange(clip_len) * stride) % num_frames


class VideoClipDataset(Dataset):
    """Clips of videos with labels.

    Args:
        samples: (path, label) pairs from `video_samples`.
        classes: class names in label order.
        clip_len: frames T per clip.
        stride: step s between sampled frames.
        train: one random clip, random crop and flip; otherwise `num_clips` clips, centre crop.
        num_clips: clips per video at evaluation.
        crop: square crop size.
        resize: short side after decoding; None keeps the decoded size.
        mean, std: per-channel normalisation in [0, 1] units.
        on_corrupt: "skip" (report and drop) or "error" (raise `CorruptFileError`).

    Shape:
        train items (3, T, crop, crop); evaluation items (K, 3, T, crop, crop).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        clip_len: int,
        stride: int,
        train: bool,
        num_clips: int = 1,
        crop: int = 112,
        resize: int | None = 128,
        mean: Sequence[float] = (0.45, 0.45, 0.45),
        std: Sequence[float] = (0.225, 0.225, 0.225),
        on_corrupt: OnCorrupt = "skip",
    ) -> None:
        for name, value in (("clip_len", clip_len), ("stride", stride), ("num_clips", num_clips), ("crop", crop)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.samples = list(samples)
        self.classes = list(classes)
        self.clip_len, self.stride, self.train, self.num_clips = clip_len, stride, train, num_clips
        self.resize = resize
        self.on_corrupt = check_on_corrupt(on_corrupt)
        spatial = [v2.RandomCrop(crop, pad_if_needed=True), v2.RandomHorizontalFlip()] if train else [
            v2.CenterCrop(crop)
        ]
        self.transform = v2.Compose(
            [*spatial, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | Skipped:
        path, label = self.samples[index]
        try:
            frames = decode_video(path, self.resize)  # (N, 3, H, W)
        except CorruptFileError as error:
            return handle_corrupt(error, self.on_corrupt)
        starts = clip_starts(frames.shape[0], self.clip_len, self.stride, self.num_clips, self.train)
        clips = []
        for start in starts:
            clip = frames[clip_indices(start, frames.shape[0], self.clip_len, self.stride)]  # (T, 3, H, W)
            clip = self.transform(tv_tensors.Video(clip))  # one crop/flip for all T frames
            clips.append(clip.as_subclass(Tensor).permute(1, 0, 2, 3))  # (T, 3, h, w) -> (3, T, h, w)
        if self.train:
            return clips[0], label
        return torch.stack(clips), label  # (K, 3, T, h, w)

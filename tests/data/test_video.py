import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("av")

from gcnet.data import CorruptFileError, Skipped, VideoClipDataset, clip_starts, decode_video, video_samples
from tests.data.clips import make_clip_folder, truncate, write_clip


def test_decode_and_clip_shapes(tmp_path: Path) -> None:
    root = make_clip_folder(tmp_path / "clips", classes=2, per_class=1, frames=10)
    classes, samples = video_samples(root)
    assert classes == ["class_0", "class_1"] and len(samples) == 2
    frames = decode_video(samples[0][0], short_side=20)
    assert frames.shape == (10, 3, 20, 20) and frames.dtype == torch.uint8
    train = VideoClipDataset(samples, classes, clip_len=4, stride=2, train=True, crop=16, resize=20)
    clip, label = train[1]
    assert clip.shape == (3, 4, 16, 16) and label == 1
    evaluation = VideoClipDataset(samples, classes, clip_len=4, stride=2, train=False, num_clips=3, crop=16, resize=20)
    clips, _ = evaluation[0]
    assert clips.shape == (3, 3, 4, 16, 16)


def test_clip_sampling() -> None:
    assert clip_starts(20, 4, 2, 3, train=False) == [0, 6, 13]  # last start 20 - 7 = 13
    assert clip_starts(5, 4, 2, 2, train=False) == [0, 0]  # too short: loop from 0
    torch.manual_seed(0)
    assert all(0 <= s <= 13 for _ in range(20) for s in clip_starts(20, 4, 2, 1, train=True))


def test_list_file(tmp_path: Path) -> None:
    write_clip(tmp_path / "a.mp4", colour=0)
    write_clip(tmp_path / "sub" / "b.mp4", colour=1)
    listing = tmp_path / "train.txt"
    listing.write_text("# path label\na.mp4 0\nsub/b.mp4 1\n")
    classes, samples = video_samples(listing)
    assert classes == ["0", "1"] and samples == [(str(tmp_path / "a.mp4"), 0), (str(tmp_path / "sub" / "b.mp4"), 1)]
    listing.write_text("a.mp4 zero\n")
    with pytest.raises(ValueError, match="train.txt:1"):
        video_samples(listing)


def test_truncated_video_is_reported_by_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_clip_folder(tmp_path / "clips", classes=1, per_class=2)
    classes, samples = video_samples(root)
    broken = truncate(Path(samples[1][0]))
    with caplog.at_level(logging.WARNING, logger="gcnet.data"):
        item = VideoClipDataset(samples, classes, 4, 2, train=True, crop=16, resize=None)[1]
    assert isinstance(item, Skipped) and item.path == str(broken)
    assert str(broken) in caplog.text
    with pytest.raises(CorruptFileError, match=str(broken)):
        VideoClipDataset(samples, classes, 4, 2, train=True, crop=16, resize=None, on_corrupt="error")[1]


def test_a_video_that_decodes_only_some_frames_is_reported_as_truncated(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "a" / "partial.mp4", frames=30, faststart=True)
    truncate(clip, keep=0.9)
    with pytest.raises(CorruptFileError, match=r"partial.mp4: decoded \d+ of its 30 frames: the file is truncated"):
        decode_video(str(clip))
    assert decode_video(str(write_clip(tmp_path / "a" / "whole.mp4", frames=30, faststart=True))).shape[0] == 30

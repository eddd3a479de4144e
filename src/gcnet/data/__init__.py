"""Data: ImageFolder images and PyAV video clips, reproducible sampling, corrupt files reported by path."""

from gcnet.data.errors import CorruptFileError, Skipped
from gcnet.data.image import ImageFolderDataset, image_transform, scan_folder
from gcnet.data.sampling import MicroBatchSampler, SeededDataset, ShardSampler, collate_skipping, epoch_batches
from gcnet.data.video import VideoClipDataset, clip_starts, decode_video, video_samples

__all__ = [
    "CorruptFileError",
    "ImageFolderDataset",
    "MicroBatchSampler",
    "SeededDataset",
    "ShardSampler",
    "Skipped",
    "VideoClipDataset",
    "clip_starts",
    "collate_skipping",
    "decode_video",
    "epoch_batches",
    "image_transform",
    "scan_folder",
    "video_samples",
]

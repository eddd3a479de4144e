"""Data: ImageFolder images and PyAV video clips, reproducible sampling, corrupt files reported by path."""

from gcnet.data.build import DataSplits, build_datasets, build_eval_dataset
from gcnet.data.errors import CorruptFileError, Skipped
from gcnet.data.image import ImageFolderDataset, image_transform, scan_folder
from gcnet.data.sampling import ResumableDistributedSampler, SeededDataset, ShardSampler, collate_skipping
from gcnet.data.video import VideoClipDataset, clip_starts, decode_video, video_samples

__all__ = [
    "CorruptFileError",
    "DataSplits",
    "ImageFolderDataset",
    "ResumableDistributedSampler",
    "SeededDataset",
    "ShardSampler",
    "Skipped",
    "VideoClipDataset",
    "build_datasets",
    "build_eval_dataset",
    "clip_starts",
    "collate_skipping",
    "decode_video",
    "image_transform",
    "scan_folder",
    "video_samples",
]

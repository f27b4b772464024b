"""Video files -> frames sampled uniformly in time, decoded with torchcodec (the optional extra
``video``: ``pip install 'titan_mm[video]'``, which also needs FFmpeg's libraries)."""

import copy
import math
import os

import torch

from titan_mm.data.image import ImageProcessor, MediaError


def sample_frame_indices(num_frames: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
    """Indices of ``fps`` frames a second of video (at most ``max_frames``, at least one), spread
    evenly from the first frame to the last."""
    duration = num_frames / native_fps
    n = max(1, min(max_frames, num_frames, round(duration * fps)))
    if n == 1:
        return [0]
    return [round(i * (num_frames - 1) / (n - 1)) for i in range(n)]


def pad_to_temporal_patches(indices: list[int]) -> list[int]:
    """``indices`` with the last repeated up to an even count of at least 2: temporal patches take
    frames in pairs, so a lone last frame is paired with itself (as Qwen2-VL's processor does)."""
    n = max(2, len(indices) + len(indices) % 2)
    return indices + indices[-1:] * (n - len(indices))


def video_frame_processor(image_processor: ImageProcessor, max_frames: int) -> ImageProcessor:
    """``image_processor`` with its pixel budget shared by a video's temporal patches, so that a
    video of ``max_frames`` frames fits the patch slots of one image."""
    processor = copy.copy(image_processor)
    temporal_patches = math.ceil(max_frames / image_processor.temporal_patch_size)
    factor = image_processor.patch_size * image_processor.merge_size
    processor.max_pixels = max(factor ** 2, image_processor.max_pixels // temporal_patches)
    processor.min_pixels = min(image_processor.min_pixels, processor.max_pixels)
    return processor


def load_video(path: str, fps: float, max_frames: int) -> tuple[torch.Tensor, list[float]]:
    """Sampled frames, uint8 [T, 3, H, W] with T even and >= 2 (see pad_to_temporal_patches), and
    the time in seconds of each sampled frame (the repeated last one not included: T or T - 1
    times, or 1 for a single frame). Only the sampled frames are decoded.

    Raises MediaError: video_unsupported (torchcodec cannot be loaded), missing_video, corrupt_video.
    """
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or FFmpeg libraries missing
        raise MediaError("video_unsupported", f"cannot decode {path}: torchcodec is unavailable "
                                              f"(pip install 'titan_mm[video]' and FFmpeg): {e}") from None
    if not os.path.isfile(path):
        raise MediaError("missing_video", f"video not found: {path}")
    try:
        decoder = VideoDecoder(path)
        native_fps = decoder.metadata.average_fps
        if not native_fps:
            raise MediaError("corrupt_video", f"video {path} has no frame rate")
        indices = sample_frame_indices(len(decoder), native_fps, fps, max_frames)
        frames = decoder.get_frames_at(pad_to_temporal_patches(indices)).data
    except (RuntimeError, ValueError, IndexError) as e:
        raise MediaError("corrupt_video", f"cannot decode video {path}: {e}") from None
    return frames, [i / native_fps for i in indices]

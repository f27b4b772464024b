"""Video files -> frames sampled uniformly in time, decoded with torchcodec (the optional extra
``video``: ``pip install 'titan_mm[video]'``, which also needs FFmpeg's libraries)."""

import os

import torch

from titan_mm.data.image import MediaError


def sample_frame_indices(num_frames: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
    """Indices of ``fps`` frames a second of video (at most ``max_frames``, at least one), spread
    evenly from the first frame to the last."""
    duration = num_frames / native_fps
    n = max(1, min(max_frames, num_frames, round(duration * fps)))
    if n == 1:
        return [0]
    return [round(i * (num_frames - 1) / (n - 1)) for i in range(n)]


def load_video(path: str, fps: float, max_frames: int) -> tuple[torch.Tensor, float]:
    """Sampled frames, uint8 [T, 3, H, W], and the seconds between two consecutive ones.

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
        frames = decoder.get_frames_at(indices).data
    except (RuntimeError, ValueError) as e:
        raise MediaError("corrupt_video", f"cannot decode video {path}: {e}") from None
    step = (indices[-1] - indices[0]) / (len(indices) - 1) if len(indices) > 1 else 1
    return frames, step / native_fps

"""Qwen3-VL's placeholder layout of a video: one block per temporal patch, each after its timestamp.

``<t0 seconds><|vision_start|><|video_pad|> * k<|vision_end|><t1 seconds><|vision_start|>...``
with k = h * w / m^2 merged patches per temporal patch, as Qwen3VLProcessor writes it. The
timestamp of a temporal patch is the mean time of its first and last frame, with one decimal.
"""

from titan_mm.data.documents import Image
from titan_mm.data.tokenizer import Tokenizer


def temporal_patch_seconds(video: Image, temporal_patch_size: int) -> list[float]:
    """Mean time of the first and last sampled frame of each temporal patch; a last patch short of
    frames repeats the last one (Qwen3VLProcessor._calculate_timestamps)."""
    seconds = video.frame_seconds
    if not seconds:
        raise ValueError("a Qwen3-VL video needs the time of each frame (Image.frame_seconds)")
    last = len(seconds) - 1
    return [(seconds[min(start, last)] + seconds[min(start + temporal_patch_size - 1, last)]) / 2
            for start in range(0, video.grid[0] * temporal_patch_size, temporal_patch_size)]


def timestamped_video_tokens(tok: Tokenizer, video: Image, *, merge_area: int,
                             temporal_patch_size: int) -> list[int]:
    """The token ids of ``video``'s placeholder blocks, timestamps included."""
    _, h, w = video.grid
    block = [tok.image_start_id] + [tok.video_id] * (h * w // merge_area) + [tok.image_end_id]
    tokens = []
    for seconds in temporal_patch_seconds(video, temporal_patch_size):
        tokens += tok.encode(f"<{seconds:.1f} seconds>") + block
    return tokens

"""M-RoPE position ids of one document (Qwen2-VL / Qwen2.5-VL), computed in the data pipeline.

Each token gets a (temporal, height, width) id. Text advances all three together by one per token.
An image or video block takes the grid coordinates of its merged patches, offset by the position
where the block starts; the text after it resumes at the block's largest id + 1. Video temporal ids
are spaced by tokens_per_second * seconds_per_temporal_patch (truncated to integers), so ids track
time rather than frame count.
"""

import torch

from titan_mm.data.documents import Document, Image


def media_position_ids(media: Image, merge: int, tokens_per_second: int) -> torch.Tensor:
    """[3, t * h/m * w/m] ids of one image or video's placeholder tokens, relative to its start."""
    t, h, w = media.grid
    t_ids = torch.arange(t)
    if media.is_video:
        # float32 products truncated, as HF's get_rope_index computes them
        step = torch.tensor(media.seconds_per_temporal_patch, dtype=torch.float32) * tokens_per_second
        t_ids = (t_ids * step).long()
    grid = torch.meshgrid(t_ids, torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
    return torch.stack(grid).flatten(1)


def mrope_position_ids(doc: Document, args) -> torch.Tensor:
    """[3, len(doc.tokens)] position ids; ``args`` is a Qwen2_5_VLArgs."""
    merge = args.vision.spatial_merge_size
    pieces, cursor, next_id = [], 0, 0
    for media in doc.images:
        if media.first_token < 0:
            raise ValueError(f"{doc.ref}: an image without first_token; build documents with "
                             f"DocumentBuilder, which records where each image's tokens start")
        n_text = media.first_token - cursor
        pieces.append(torch.arange(next_id, next_id + n_text).expand(3, -1))
        block = media_position_ids(media, merge, args.tokens_per_second) + next_id + n_text
        pieces.append(block)
        cursor = media.first_token + block.shape[1]
        next_id = int(block.max()) + 1
    pieces.append(torch.arange(next_id, next_id + len(doc.tokens) - cursor).expand(3, -1))
    return torch.cat(pieces, dim=1)

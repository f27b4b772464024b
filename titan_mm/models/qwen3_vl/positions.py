"""M-RoPE position ids of one document, as HF Qwen3-VL's get_rope_index computes them.

Every placeholder block has temporal size one: an image is one block, and a video is one block per
temporal patch (its frames are separated by "<t seconds>" text, see video.py). Text advances all
three ids by one per token. A block of gh x gw merged tokens starting at id s takes ids
(s, s + row, s + col); the text after it resumes at s + max(gh, gw).
"""

import torch

from titan_mm.data.documents import Document


def placeholder_blocks(doc: Document, merge: int) -> list[tuple[int, int, int]]:
    """(first token, gh, gw) of every placeholder block of ``doc``, in token order."""
    blocks = []
    for media in doc.images:
        t, h, w = media.grid
        gh, gw = h // merge, w // merge
        placeholder = doc.tokens[media.first_token]
        start = media.first_token
        for frame in range(t):
            if frame > 0:  # the next temporal patch's block follows its timestamp text
                start = doc.tokens.index(placeholder, start + gh * gw)
            if doc.tokens[start:start + gh * gw] != [placeholder] * (gh * gw):
                raise ValueError(f"{doc.ref}: expected {gh * gw} placeholder tokens at {start}")
            blocks.append((start, gh, gw))
    return blocks


def mrope_position_ids(doc: Document, args) -> torch.Tensor:
    """[3, len(doc.tokens)] (temporal, height, width) position ids; ``args`` is a Qwen3VLArgs."""
    pieces, cursor, next_id = [], 0, 0
    for start, gh, gw in placeholder_blocks(doc, args.vision.spatial_merge_size):
        pieces.append(torch.arange(next_id, next_id + start - cursor).expand(3, -1))
        next_id += start - cursor
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        pieces.append(torch.stack([torch.zeros_like(rows), rows, cols]).flatten(1) + next_id)
        next_id += max(gh, gw)
        cursor = start + gh * gw
    pieces.append(torch.arange(next_id, next_id + len(doc.tokens) - cursor).expand(3, -1))
    return torch.cat(pieces, dim=1)

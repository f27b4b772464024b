"""Host-side facts about a batch, read from its CPU tensors before they move to the device."""

from dataclasses import dataclass

import torch

from titan_mm.models.multimodal import visual_item_ids


@dataclass
class BatchShape:
    tokens: int
    """Non-padding tokens."""
    doc_len_sq_sum: int
    """Sum over documents of length^2 (attention cost)."""
    patches: int
    """Valid image patches."""
    image_patches_sq_sum: int
    """Sum over visual items (an image, or one frame of a video: each attends on its own) of
    patches^2 (ViT attention cost)."""
    label_tokens: int
    """Tokens that carry a label."""

    @classmethod
    def of(cls, batch: dict) -> "BatchShape":
        doc_ids = batch["document_ids"]
        # one id per (row, document): row * S + doc, so documents of different rows differ
        keyed = doc_ids + torch.arange(doc_ids.shape[0])[:, None] * doc_ids.shape[1]
        doc_len = torch.unique(keyed[doc_ids >= 0], return_counts=True)[1]
        item_NL = visual_item_ids(batch["grid_thw"])
        N, L = item_NL.shape
        # one id per (slot, item), as for documents
        keyed = item_NL + torch.arange(N)[:, None] * L
        item_len = torch.unique(keyed[item_NL >= 0], return_counts=True)[1]
        return cls(tokens=int(doc_len.sum()), doc_len_sq_sum=int((doc_len ** 2).sum()),
                   patches=int(item_len.sum()), image_patches_sq_sum=int((item_len ** 2).sum()),
                   label_tokens=int((batch["labels"] != -100).sum()))

"""Host-side facts about a batch, read from its CPU tensors before they move to the device."""

from dataclasses import dataclass

import torch


@dataclass
class BatchShape:
    tokens: int
    """Non-padding tokens."""
    doc_len_sq_sum: int
    """Sum over documents of length^2 (attention cost)."""
    patches: int
    """Valid image patches."""
    image_patches_sq_sum: int
    """Sum over images of patches^2 (ViT attention cost)."""
    label_tokens: int
    """Tokens that carry a label."""

    @classmethod
    def of(cls, batch: dict) -> "BatchShape":
        doc_ids = batch["document_ids"]
        # one id per (row, document): row * S + doc, so documents of different rows differ
        keyed = doc_ids + torch.arange(doc_ids.shape[0])[:, None] * doc_ids.shape[1]
        doc_len = torch.unique(keyed[doc_ids >= 0], return_counts=True)[1]
        img_len = (batch["grid_thw"][..., 0] >= 0).sum(dim=1)
        return cls(tokens=int(doc_len.sum()), doc_len_sq_sum=int((doc_len ** 2).sum()),
                   patches=int(img_len.sum()), image_patches_sq_sum=int((img_len ** 2).sum()),
                   label_tokens=int((batch["labels"] != -100).sum()))

"""Attention masks and the attention call shared by every model.

Masks are built from per-token ids computed in the dataloader, with tensor ops only (no host syncs):
decoders get causal attention restricted to each packed document, vision encoders bidirectional
attention restricted to each image's (or video frame's) own valid patches.
"""

import torch
import torch.nn.functional as F


def document_causal_mask(document_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool: query i sees key j iff j <= i and both belong to the same document.

    Padding tokens share one id, so they only see padding and never leak into documents.
    """
    S = document_ids_BS.shape[1]
    same_doc_BSS = document_ids_BS[:, :, None] == document_ids_BS[:, None, :]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=document_ids_BS.device).tril()
    return (same_doc_BSS & causal_SS)[:, None]


def frame_patch_mask(grid_NL3: torch.Tensor) -> torch.Tensor:
    """[N, 1, L, L] bool: a valid patch sees every valid patch of its own image frame (same t).

    Images have one frame; videos attend frame by frame (as HF's cu_seqlens, one segment per
    temporal patch). A padding patch sees only itself, so fully padded slots stay finite (their
    outputs are unused).
    """
    t_NL = grid_NL3[..., 0]
    valid_NL = t_NL >= 0
    eye_LL = torch.eye(t_NL.shape[1], dtype=torch.bool, device=t_NL.device)
    same_frame_NLL = (t_NL[:, :, None] == t_NL[:, None, :]) & valid_NL[:, :, None] & valid_NL[:, None, :]
    return (same_frame_NLL | eye_LL)[:, None]


def sdpa(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
         mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention; k/v may have fewer heads than q (grouped-query attention)."""
    enable_gqa = k_BHSD.shape[1] != q_BHSD.shape[1]
    return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask, enable_gqa=enable_gqa)

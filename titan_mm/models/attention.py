"""Attention masks and the attention call shared by every model.

Masks are built from per-token ids computed in the dataloader, with tensor ops only (no host syncs):
decoders get causal attention restricted to each packed document, vision encoders bidirectional
attention restricted to each image's own valid patches.
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


def image_patch_mask(valid_NL: torch.Tensor) -> torch.Tensor:
    """[N, 1, L, L] bool: valid patches see every valid patch of their own image.

    A padding patch sees only itself, so fully padded images stay finite (their outputs are unused).
    """
    L = valid_NL.shape[1]
    eye_LL = torch.eye(L, dtype=torch.bool, device=valid_NL.device)
    return ((valid_NL[:, :, None] & valid_NL[:, None, :]) | eye_LL)[:, None]


def sdpa(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
         mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention; k/v may have fewer heads than q (grouped-query attention)."""
    enable_gqa = k_BHSD.shape[1] != q_BHSD.shape[1]
    return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask, enable_gqa=enable_gqa)

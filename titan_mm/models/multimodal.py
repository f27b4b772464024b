"""Pieces every vision-language model shares: which visual item each patch belongs to, and
placing image embeddings at image tokens.

A patch slot holds several visual items one after another (an image, or one temporal patch of a
video; titan_mm/data/packing.py). Each keeps its own (t, h, w) patch coordinates in merge-block
order, so an item starts at its (t, 0, 0) patch: item ids follow from ``grid_thw`` with tensor ops,
and every vision encoder attends, resamples its position table and merges within one item.
"""

import torch


def visual_item_ids(grid_NL3: torch.Tensor) -> torch.Tensor:
    """[N, L] long: each patch's visual item within its slot, 0, 1, ... in slot order; -1 on
    padding. (Ids of equal value in different slots are different items.)"""
    valid_NL = grid_NL3[..., 0] >= 0
    starts_NL = valid_NL & (grid_NL3[..., 1] == 0) & (grid_NL3[..., 2] == 0)
    return torch.where(valid_NL, starts_NL.long().cumsum(-1) - 1, -1)


def visual_item_hw(grid_NL3: torch.Tensor) -> torch.Tensor:
    """[N, L, 2] long: the (h, w) patch-grid size of each patch's visual item (0 on padding), by one
    scatter of maxima over the items, so no host sync."""
    N, L, _ = grid_NL3.shape
    item_NL = visual_item_ids(grid_NL3)
    slot_N1 = torch.arange(N, device=grid_NL3.device)[:, None]
    # one row per (slot, item); padding patches all go to the spare row N * L
    key_T = torch.where(item_NL >= 0, slot_N1 * L + item_NL, N * L).flatten()
    hw_T2 = grid_NL3[..., 1:].reshape(-1, 2)
    last_K2 = hw_T2.new_full((N * L + 1, 2), -1).scatter_reduce(
        0, key_T[:, None].expand(-1, 2), hw_T2, reduce="amax")
    return (last_K2[key_T] + 1).view(N, L, 2)


def image_token_positions(image_token_index_BS: torch.Tensor, n_embeds: int) -> torch.Tensor:
    """[M] long: for each row of the embeddings tensor, the flat (b * S + s) position of its image
    token, or B * S (one spare row past the end) for padding slots that no token uses.

    Inverts the dataloader's image_token_index with one scatter (fixed shapes, no host sync):
    tokens without an image write into a spare slot M that is dropped.
    """
    index_T = image_token_index_BS.flatten()
    T = index_T.shape[0]
    target = torch.where(index_T >= 0, index_T, n_embeds)
    positions = torch.full((n_embeds + 1,), T, dtype=torch.long, device=index_T.device)
    positions.scatter_(0, target, torch.arange(T, device=index_T.device))
    return positions[:n_embeds]


def scatter_image_embeddings(h_BSD: torch.Tensor, image_embeds_MD: torch.Tensor,
                             positions_M: torch.Tensor) -> torch.Tensor:
    """Put image embeddings at their image tokens' positions.

    ``image_embeds_MD`` holds every merged patch slot of the batch, padding included
    ([N * L', D], image-major); ``positions_M`` comes from image_token_positions. The embeddings
    are written into the token stream (index_put; padding slots land in a spare row that is
    dropped), so the backward pass only gathers the gradient at those positions: no accumulation
    of thousands of duplicate indices, which a gather of the embeddings per token would cost.
    """
    B, S, D = h_BSD.shape
    spare = h_BSD.new_zeros(1, D)
    h_TD = torch.cat([h_BSD.reshape(B * S, D), spare])
    h_TD = h_TD.index_put((positions_M,), image_embeds_MD.to(h_BSD.dtype))
    return h_TD[:-1].view(B, S, D)

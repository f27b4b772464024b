"""Pieces every vision-language model shares: placing image embeddings at image tokens."""

import torch


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

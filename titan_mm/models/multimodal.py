"""Pieces every vision-language model shares: placing image embeddings at image tokens."""

import torch


def scatter_image_embeddings(h_BSD: torch.Tensor, image_embeds_MD: torch.Tensor,
                             image_token_index_BS: torch.Tensor) -> torch.Tensor:
    """Put image embeddings at image-token positions.

    ``image_embeds_MD`` holds every merged patch slot of the batch, padding included
    ([N * L', D], image-major). ``image_token_index_BS`` is built by the dataloader: for an image
    token, the row of its own embedding in image_embeds_MD; -1 elsewhere. Fixed shapes, no host
    sync: padding slots are simply never indexed.
    """
    is_image_BS1 = (image_token_index_BS >= 0)[..., None]
    gathered_BSD = image_embeds_MD[image_token_index_BS.clamp(min=0)]
    return torch.where(is_image_BS1, gathered_BSD.to(h_BSD.dtype), h_BSD)

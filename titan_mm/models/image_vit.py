"""Pieces shared by the ViTs that read whole images of one fixed size per batch, pixels [B, C, H, W]
(CLIP, DINOv2: the encoders of Cambrian's vision aggregator), as opposed to the packed
native-resolution patch layout of the SigLIP2 and Qwen-VL encoders.

Such a ViT runs on ``1 + extra + h * w`` tokens per image: a class token, ``extra`` register
tokens, and one token per p x p patch of an h x w patch grid; every token attends to every token of
its image, so attention needs no mask (unmasked SDPA is the flash kernel on GPUs).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class ImageSelfAttention(nn.Module):
    """Multi-head self-attention over the tokens of each image, unmasked, with HF's module names
    (q_proj, k_proj, v_proj, out_proj; the same in CLIP, DINOv2 and SigLIP2, so one tensor-parallel
    plan fits all)."""

    def __init__(self, dim: int, n_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        # [B, heads, L, head_dim]; under tensor parallelism this rank's heads
        q, k, v = (proj(x_BLD).view(B, L, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # every token sees its whole image: no mask
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))


class PatchEmbed(nn.Module):
    """Cuts images into p x p patches and embeds them with one matmul. The weight keeps the shape
    of HF's stride-equals-kernel Conv2d [dim, C, p, p], so checkpoints map by renaming alone."""

    def __init__(self, dim: int, in_channels: int, patch_size: int, bias: bool):
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter(torch.empty(dim, in_channels, patch_size, patch_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def forward(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, h, w, dim] with h = H / p, w = W / p."""
        B, C, H, W = pixels_BCHW.shape
        p = self.patch_size
        x = pixels_BCHW.to(self.weight.dtype).reshape(B, C, H // p, p, W // p, p)
        x = x.permute(0, 2, 4, 1, 3, 5).flatten(3)  # B C h p w p -> B h w (C p p)
        return F.linear(x, self.weight.flatten(1), self.bias)


def patch_grid(pixels_BCHW: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """(h, w) patch grid of an image batch; raises when a side is not a multiple of the patch
    (HF's convolution would drop the remainder silently)."""
    H, W = pixels_BCHW.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H} x {W} is not a multiple of the patch size {patch_size}; "
                         f"resize images to multiples of {patch_size} in the data pipeline")
    return H // patch_size, W // patch_size


def resize_position_table(table_KD: torch.Tensor, h: int, w: int, antialias: bool) -> torch.Tensor:
    """A learned [side * side, D] table of patch positions for an h x w grid: the table itself when
    the grid is its own, else resized bicubically (align_corners=False) in fp32, as transformers'
    ``interpolate_pos_encoding`` of CLIP and DINOv2 (``antialias``: Dinov2WithRegisters')."""
    side = math.isqrt(table_KD.shape[0])
    if (h, w) == (side, side):
        return table_KD
    grid_1DSS = table_KD.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid_1DSS.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=antialias)
    return out.to(table_KD.dtype).permute(0, 2, 3, 1).reshape(h * w, -1)


def layers_to_run(n_layers: int, select_layer: int) -> int:
    """How many blocks produce HF's ``hidden_states[select_layer]`` (0: the embeddings, k: the
    output of block k, -1: of the last block, -2: of the one before)."""
    run = n_layers + 1 + select_layer if select_layer < 0 else select_layer
    if not 0 <= run <= n_layers:
        raise ValueError(f"select_layer={select_layer} is outside the {n_layers + 1} hidden states of a "
                         f"{n_layers}-layer ViT; choose -{n_layers + 1} to {n_layers}")
    return run


def vit_forward_flops(*, tokens: int, patches: int, patch_dim: int, dim: int, n_layers: int,
                      mlp_matrices_params: int) -> int:
    """Matmul FLOPs of one image's forward: patch embedding, q/k/v/out projections, MLP
    (``mlp_matrices_params`` weights a block, e.g. 2 * dim * ffn) and attention over all
    ``tokens`` pairs (QK^T and AV: 2 * 2 * tokens^2 * dim a block)."""
    linear = n_layers * (4 * dim * dim + mlp_matrices_params)
    return (2 * patch_dim * dim * patches + 2 * linear * tokens
            + n_layers * 4 * dim * tokens * tokens)

"""CLIP's vision tower, weight-compatible with HF CLIPVisionModel: class token, learned positions,
pre_layrnorm, pre-LN blocks with quick-GELU MLPs.

It reads images of one size per batch, pixels [B, C, H, W], and returns the hidden state that
``select_layer`` names (HF's ``output_hidden_states`` indexing; LLaVA and Cambrian read the
penultimate, -2) as a patch grid [B, h, w, dim] plus the class token [B, dim]. Only the blocks up
to that layer are built. HF's post_layernorm, which normalises the pooled class token only, is
not built (features are read before it).
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from titan_mm.models.image_vit import (
    ImageSelfAttention, PatchEmbed, layers_to_run, patch_grid, resize_position_table, vit_forward_flops,
)


@dataclass
class CLIPVisionArgs:
    dim: int = 1024
    n_layers: int = 24
    """Blocks of the checkpoint (HF num_hidden_layers); ``select_layer`` decides how many are built."""
    n_heads: int = 16
    ffn_hidden_dim: int = 4096
    patch_size: int = 14
    image_size: int = 336
    """Side of the images the position table was trained for: (image_size / patch_size)^2 positions."""
    in_channels: int = 3
    norm_eps: float = 1e-5
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    """MLP activation: OpenAI's CLIP uses quick_gelu (x * sigmoid(1.702 x)), some others exact gelu."""
    select_layer: int = -2
    """The hidden state returned: 0 the embeddings (after pre_layrnorm), k the output of block k,
    -1 the last block's, -2 the penultimate (LLaVA's and Cambrian's mm_vision_select_layer)."""
    interpolate_pos_encoding: bool = False
    """Accept other image sizes by resizing the position table bicubically (HF's
    interpolate_pos_encoding=True); off: any size but image_size is an error, as in HF."""
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    init_std: float = 0.02

    @property
    def layers_built(self) -> int:
        return layers_to_run(self.n_layers, self.select_layer)

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    def flops_per_image(self, height: int, width: int) -> int:
        """Matmul FLOPs of one image's forward at height x width pixels (the blocks built); a
        training step that trains the encoder spends 3x that."""
        patches = (height // self.patch_size) * (width // self.patch_size)
        return vit_forward_flops(tokens=patches + 1, patches=patches, patch_dim=self.in_channels * self.patch_size ** 2,
                                 dim=self.dim, n_layers=self.layers_built,
                                 mlp_matrices_params=2 * self.dim * self.ffn_hidden_dim)


class CLIPMLP(nn.Module):
    def __init__(self, args: CLIPVisionArgs):
        super().__init__()
        self.quick_gelu = args.activation == "quick_gelu"
        self.fc1 = nn.Linear(args.dim, args.ffn_hidden_dim)
        self.fc2 = nn.Linear(args.ffn_hidden_dim, args.dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h))


class CLIPBlock(nn.Module):
    """Module names are HF's, which are also SigLIP2's: the SigLIP2 tensor-parallel plan applies."""

    def __init__(self, args: CLIPVisionArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.self_attn = ImageSelfAttention(args.dim, args.n_heads)
        self.layer_norm2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = CLIPMLP(args)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionEncoder(nn.Module):
    def __init__(self, args: CLIPVisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args.dim, args.in_channels, args.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(args.dim))
        # the class token's position, then the grid's, row-major (HF's position_embedding.weight)
        self.pos_embed = nn.Parameter(torch.empty(1 + args.grid_side ** 2, args.dim))
        self.pre_layrnorm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.layers = nn.ModuleDict({str(i): CLIPBlock(args) for i in range(args.layers_built)})

    def forward(self, pixels_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, C, H, W] -> (patch features [B, h, w, dim], class token [B, dim])."""
        h, w = patch_grid(pixels_BCHW, self.args.patch_size)
        if (h, w) != (self.args.grid_side,) * 2 and not self.args.interpolate_pos_encoding:
            raise ValueError(f"CLIP takes {self.args.image_size} x {self.args.image_size} images, got "
                             f"{tuple(pixels_BCHW.shape[-2:])}; resize them, or set interpolate_pos_encoding")
        patches_BLD = self.patch_embed(pixels_BCHW).flatten(1, 2)
        cls_B1D = self.class_embedding.to(patches_BLD.dtype).expand(patches_BLD.shape[0], 1, -1)
        positions_LD = torch.cat([self.pos_embed[:1], resize_position_table(self.pos_embed[1:], h, w, antialias=False)])
        x = self.pre_layrnorm(torch.cat([cls_B1D, patches_BLD], dim=1) + positions_LD)
        for layer in self.layers.values():
            x = layer(x)
        return x[:, 1:].unflatten(1, (h, w)), x[:, 0]

    @torch.no_grad()
    def init_weights(self):
        """CLIP-style random init (the encoders are usually loaded from HF weights)."""
        std = self.args.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for p in (self.patch_embed.weight, self.class_embedding, self.pos_embed):
            nn.init.normal_(p, std=std)

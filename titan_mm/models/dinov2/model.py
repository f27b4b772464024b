"""DINOv2's ViT, weight-compatible with HF Dinov2Model and Dinov2WithRegistersModel: class token,
optional register tokens, learned positions resized bicubically to any image size, pre-LN blocks
with layer scale, a GELU MLP (SwiGLU for the giant size), a final LayerNorm.

It reads images of one size per batch, pixels [B, C, H, W], and returns the final LayerNorm of the
hidden state that ``select_layer`` names (-1: HF's last_hidden_state, what Cambrian reads; other
layers as Dinov2Backbone normalises them) as a patch grid [B, h, w, dim] plus the class token
[B, dim]; register tokens are dropped. Only the blocks up to that layer are built. The mask token
(masked-image pre-training only) is not built.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from titan_mm.models.image_vit import (
    ImageSelfAttention, PatchEmbed, layers_to_run, patch_grid, resize_position_table, vit_forward_flops,
)


@dataclass
class Dinov2Args:
    dim: int = 1024
    n_layers: int = 24
    """Blocks of the checkpoint (HF num_hidden_layers); ``select_layer`` decides how many are built."""
    n_heads: int = 16
    mlp_ratio: float = 4.0
    """MLP width = int(dim * mlp_ratio); with SwiGLU, 2/3 of that rounded up to a multiple of 8."""
    swiglu: bool = False
    """SwiGLU MLP (silu(gate) * up -> down), as DINOv2-giant; else Linear-GELU-Linear."""
    patch_size: int = 14
    image_size: int = 518
    """Side of the images the position table was trained for: (image_size / patch_size)^2
    positions, resized to every other size."""
    num_register_tokens: int = 0
    """Register tokens after the class token (Dinov2WithRegisters); their outputs are dropped."""
    pos_embed_antialias: bool = False
    """Resize the position table with antialias, as Dinov2WithRegistersModel does (Dinov2Model
    does not)."""
    qkv_bias: bool = True
    in_channels: int = 3
    norm_eps: float = 1e-6
    layerscale_init: float = 1.0
    """Initial layer-scale value (for init_weights only; checkpoints carry their own)."""
    select_layer: int = -1
    """The hidden state returned, normalised by the final LayerNorm: -1 the last block's
    (HF last_hidden_state), -2 the penultimate, k the output of block k, 0 the embeddings."""
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    init_std: float = 0.02

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(self.dim * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden

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
        return vit_forward_flops(tokens=patches + 1 + self.num_register_tokens, patches=patches,
                                 patch_dim=self.in_channels * self.patch_size ** 2, dim=self.dim,
                                 n_layers=self.layers_built,
                                 mlp_matrices_params=(3 if self.swiglu else 2) * self.dim * self.ffn_hidden_dim)


class Dinov2MLP(nn.Module):
    def __init__(self, args: Dinov2Args):
        super().__init__()
        self.fc1 = nn.Linear(args.dim, args.ffn_hidden_dim)
        self.fc2 = nn.Linear(args.ffn_hidden_dim, args.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Dinov2SwiGLU(nn.Module):
    def __init__(self, args: Dinov2Args):
        super().__init__()
        # HF checkpoints fuse gate and up into one weights_in (the HF adapter splits it): apart,
        # tensor parallelism splits each of them by hidden units
        self.gate_proj = nn.Linear(args.dim, args.ffn_hidden_dim)
        self.up_proj = nn.Linear(args.dim, args.ffn_hidden_dim)
        self.down_proj = nn.Linear(args.ffn_hidden_dim, args.dim)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        return x * self.lambda1


class Dinov2Block(nn.Module):
    def __init__(self, args: Dinov2Args):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = ImageSelfAttention(args.dim, args.n_heads, args.qkv_bias)
        self.layer_scale1 = LayerScale(args.dim)
        self.norm2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = Dinov2SwiGLU(args) if args.swiglu else Dinov2MLP(args)
        self.layer_scale2 = LayerScale(args.dim)

    def forward(self, x):
        x = x + self.layer_scale1(self.attn(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2Encoder(nn.Module):
    def __init__(self, args: Dinov2Args):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args.dim, args.in_channels, args.patch_size, bias=True)
        # HF's shapes, so checkpoints map by renaming
        self.cls_token = nn.Parameter(torch.empty(1, 1, args.dim))
        self.register_tokens = (nn.Parameter(torch.empty(1, args.num_register_tokens, args.dim))
                                if args.num_register_tokens else None)
        # the class token's position, then the grid's, row-major
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + args.grid_side ** 2, args.dim))
        self.layers = nn.ModuleDict({str(i): Dinov2Block(args) for i in range(args.layers_built)})
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, pixels_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, C, H, W] -> (patch features [B, h, w, dim], class token [B, dim])."""
        h, w = patch_grid(pixels_BCHW, self.args.patch_size)
        patches_BLD = self.patch_embed(pixels_BCHW).flatten(1, 2)
        B = patches_BLD.shape[0]
        positions_LD = torch.cat([self.pos_embed[0, :1], resize_position_table(
            self.pos_embed[0, 1:], h, w, antialias=self.args.pos_embed_antialias)])
        x = torch.cat([self.cls_token.expand(B, -1, -1), patches_BLD], dim=1) + positions_LD
        if self.register_tokens is not None:  # between the class token and the patches, without positions
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        for layer in self.layers.values():
            x = layer(x)
        x = self.norm(x)
        return x[:, 1 + self.args.num_register_tokens:].unflatten(1, (h, w)), x[:, 0]

    @torch.no_grad()
    def init_weights(self):
        """DINOv2-style random init (the encoders are usually loaded from HF weights)."""
        std = self.args.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, PatchEmbed)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.lambda1, self.args.layerscale_init)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        nn.init.trunc_normal_(self.cls_token, std=std)
        if self.register_tokens is not None:
            nn.init.trunc_normal_(self.register_tokens, std=std)

"""Native-resolution ViT in the SigLIP2 (naflex) style, weight-compatible with HF Siglip2VisionModel.

Input is the fixed-shape N x L patch layout: ``pixels_NLD`` holds the flattened patches of one or
more images a slot and ``grid_NL3`` each patch's (t, h, w) coordinate within its image, -1 on
padding rows. A Linear embeds the pre-cut patches; a learned P x P position table is resized
bilinearly (with antialias when shrinking) to each image's own grid; attention is bidirectional and
restricted to the image's own patches.
SigLIP2's attention-pooling head is not built: the VLMs here read the per-patch states.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from titan_mm.models.attention import attend, segment_mask
from titan_mm.models.multimodal import visual_item_hw, visual_item_ids


@dataclass
class VisionArgs:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden_dim: int = 512
    patch_size: int = 8
    in_channels: int = 3
    temporal_patch_size: int = 1
    pos_embed_side: int = 16
    """Side of the learned position table (P x P), resized to each image's grid."""
    norm_eps: float = 1e-6
    pos_embed_antialias: bool = True
    """Antialias when the table is shrunk (what SigLIP2 does); plain bilinear otherwise."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channels_last: bool = False
    """Patches flattened as (tp, p, p, C), the layout of SigLIP2's processor and checkpoints,
    instead of (C, tp, p, p)."""
    apply_post_layernorm: bool = True
    """Normalise the output with post_layernorm, as Siglip2VisionModel's last_hidden_state. HF LLaVA
    reads the last layer before it (vision_feature_layer=-1); its weights are kept either way."""
    init_std: float = 0.02
    attention_backend: str = "sdpa"
    """Attention kernel (titan_mm/models/attention.py); set from model.attention_backend."""

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def bilinear_weights(pos_NL: torch.Tensor, out_size_NL: torch.Tensor, in_size: int,
                     antialias: bool) -> torch.Tensor:
    """[N, L, in_size] weights that resample a length-``in_size`` axis to ``out_size`` (each
    patch's own image's, or anything that broadcasts to [N, L]) at ``pos``.

    The same function as F.interpolate(mode="bilinear", align_corners=False[, antialias]) along one
    axis, but per image with sizes held in a tensor, so no host sync is needed.
    """
    scale_NL = in_size / out_size_NL.clamp(min=1).float()
    support_NL = scale_NL.clamp(min=1.0) if antialias else torch.ones_like(scale_NL)
    center_NL = (pos_NL.clamp(min=0).float() + 0.5) * scale_NL
    src = torch.arange(in_size, device=pos_NL.device, dtype=torch.float32) + 0.5
    w_NLI = (1 - (src - center_NL[..., None]).abs() / support_NL[..., None]).clamp(min=0)
    return w_NLI / w_NLI.sum(-1, keepdim=True)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.head_dim = args.dim // args.n_heads
        self.q_proj = nn.Linear(args.dim, args.dim)
        self.k_proj = nn.Linear(args.dim, args.dim)
        self.v_proj = nn.Linear(args.dim, args.dim)
        self.out_proj = nn.Linear(args.dim, args.dim)

    def forward(self, x_NLD, mask):
        N, L, _ = x_NLD.shape
        q, k, v = (proj(x_NLD).view(N, L, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attend(q, k, v, mask).reshape(N, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.dim, args.ffn_hidden_dim)
        self.fc2 = nn.Linear(args.ffn_hidden_dim, args.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.self_attn = VisionAttention(args)
        self.layer_norm2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = VisionMLP(args)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = nn.Linear(args.patch_dim, args.dim)
        self.pos_embed = nn.Parameter(torch.empty(args.pos_embed_side ** 2, args.dim))
        self.layers = nn.ModuleDict({str(i): VisionBlock(args) for i in range(args.n_layers)})
        self.post_layernorm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def position_embeddings(self, grid_NL3: torch.Tensor) -> torch.Tensor:
        """The P x P table resized to each image's (h, w) grid, read at each patch: [N, L, dim]."""
        P = self.args.pos_embed_side
        hw_NL2 = visual_item_hw(grid_NL3)
        w_h = bilinear_weights(grid_NL3[..., 1], hw_NL2[..., 0], P, self.args.pos_embed_antialias)
        w_w = bilinear_weights(grid_NL3[..., 2], hw_NL2[..., 1], P, self.args.pos_embed_antialias)
        w_NLPP = (w_h[..., :, None] * w_w[..., None, :]).flatten(-2)
        return w_NLPP.to(self.pos_embed.dtype) @ self.pos_embed

    def forward(self, pixels_NLD: torch.Tensor, grid_NL3: torch.Tensor,
                frame_lengths_NF: torch.Tensor | None = None) -> torch.Tensor:
        """frame_lengths_NF: each slot's visual item (and padding) lengths, for the varlen backend."""
        h = self.patch_embed(pixels_NLD.to(self.patch_embed.weight.dtype))
        h = h + self.position_embeddings(grid_NL3).to(h.dtype)
        # each image (each frame of a video) attends to itself; padding patches form one more segment
        mask = segment_mask(visual_item_ids(grid_NL3), causal=False, backend=self.args.attention_backend,
                            segment_lengths_BK=frame_lengths_NF)
        for layer in self.layers.values():
            h = layer(h, mask)
        return self.post_layernorm(h) if self.args.apply_post_layernorm else h

    @torch.no_grad()
    def init_weights(self):
        std = self.args.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=std)

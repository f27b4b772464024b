"""Qwen3-VL: a ViT with 2-D rotary and DeepStack mergers -> Qwen3 decoder with interleaved M-RoPE.

The ViT embeds pre-cut patches (HF's Conv3d with kernel = stride is a Linear over the flattened
patch), adds a learned sqrt x sqrt position table resampled to each image's grid (bilinear,
align_corners=True), and attends bidirectionally within each temporal frame of each image or video.
The merger turns every m x m block into one token; DeepStack mergers do the same with the outputs
of a few intermediate ViT layers, and those features are added to the hidden states of the first
decoder layers at the visual tokens. Everything runs on the fixed N x L patch layout, several
images to a slot, with no host syncs: which image each patch belongs to, and that image's size,
come from grid_thw through tensor ops (models/multimodal.py).
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from titan_mm.data.batch import BatchShape
from titan_mm.data.image import VisionInputSpec
from titan_mm.models.attention import attend, segment_mask
from titan_mm.models.llama.model import Decoder, DecoderArgs
from titan_mm.models.multimodal import (image_token_positions, scatter_image_embeddings, visual_item_hw,
                                        visual_item_ids)
from titan_mm.models.qwen3_vl.positions import mrope_position_ids
from titan_mm.models.qwen3_vl.video import timestamped_video_tokens
from titan_mm.models.rope import apply_rope, rope_2d_cos_sin, rope_inv_freq


@dataclass
class VisionArgs:
    dim: int = 1152
    n_layers: int = 27
    n_heads: int = 16
    ffn_hidden_dim: int = 4304
    patch_size: int = 16
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    """Learned position table of side sqrt(num_position_embeddings), resampled to each grid."""
    deepstack_layers: tuple[int, ...] = (8, 16, 24)
    """ViT layers whose outputs feed the DeepStack mergers, added after decoder layers 0, 1, ..."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    init_std: float = 0.02
    attention_backend: str = "sdpa"
    """Attention kernel (titan_mm/models/attention.py); set from model.attention_backend."""

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def pos_embed_side(self) -> int:
        return int(self.num_position_embeddings ** 0.5)


@dataclass
class Qwen3VLArgs:
    vision: VisionArgs = field(default_factory=VisionArgs)
    decoder: DecoderArgs = field(default_factory=lambda: DecoderArgs(
        qk_norm=True, mrope_section=(24, 20, 20), mrope_interleaved=True, rope_theta=5_000_000.0))
    image_token_id: int = 151655
    """Token ids recorded in HF config.json (the model itself reads image_token_index)."""
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @property
    def vision_input(self) -> VisionInputSpec:
        v = self.vision
        return VisionInputSpec(v.patch_size, v.temporal_patch_size, v.spatial_merge_size,
                               v.image_mean, v.image_std, v.in_channels,
                               positions_fn=functools.partial(mrope_position_ids, args=self),
                               position_dims=3,
                               video_layout=functools.partial(timestamped_video_tokens,
                                                              merge_area=v.spatial_merge_size ** 2,
                                                              temporal_patch_size=v.temporal_patch_size))


def align_corners_taps(pos_NL: torch.Tensor, size_NL: torch.Tensor, side: int):
    """The two table rows (and weights) that bilinear align_corners=True resampling of a
    ``side``-long axis to ``size`` (each patch's own image's) reads at ``pos``:
    ([N, L, 2] long, [N, L, 2] float)."""
    pos = pos_NL.clamp(min=0).float()
    # the same expression as HF's (endpoints land on 0 and side - 1), so parity is to the bit
    src = pos * (side - 1) / (size_NL - 1).clamp(min=1)
    floor = src.floor()
    offsets = torch.arange(2, device=pos.device)
    taps = (floor.long()[..., None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[..., None] - floor[..., None] - offsets).abs()).clamp(min=0)
    return taps, weights


class PatchEmbed(nn.Module):
    """HF's Conv3d(kernel = stride = (tp, p, p)) applied to pre-cut patches, i.e. a Linear.

    The weight keeps the Conv3d shape [dim, C, tp, p, p] so HF checkpoints map by name only.
    """

    def __init__(self, args: VisionArgs):
        super().__init__()
        p = args.patch_size
        self.weight = nn.Parameter(torch.empty(args.dim, args.in_channels, args.temporal_patch_size, p, p))
        self.bias = nn.Parameter(torch.empty(args.dim))

    def forward(self, pixels_NLD: torch.Tensor) -> torch.Tensor:
        # patch features are ordered (C, tp, p, p), the order of the kernel's flattened weight
        return F.linear(pixels_NLD.to(self.weight.dtype), self.weight.flatten(1), self.bias)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.head_dim = args.dim // args.n_heads
        # HF fuses q, k and v into one qkv Linear (the HF adapter splits and concatenates it):
        # apart, tensor parallelism can split each of them by heads
        self.q_proj = nn.Linear(args.dim, args.dim)
        self.k_proj = nn.Linear(args.dim, args.dim)
        self.v_proj = nn.Linear(args.dim, args.dim)
        self.proj = nn.Linear(args.dim, args.dim)

    def forward(self, x_NLD, cos, sin, mask):
        N, L, _ = x_NLD.shape
        # -1 heads: tensor parallelism leaves each rank a slice of them
        q, k, v = (proj(x_NLD).view(N, L, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.proj(attend(q, k, v, mask).reshape(N, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.linear_fc1 = nn.Linear(args.dim, args.ffn_hidden_dim)
        self.linear_fc2 = nn.Linear(args.ffn_hidden_dim, args.dim)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = VisionAttention(args)
        self.norm2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = VisionMLP(args)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenate each m x m block (consecutive in merge-block order), then Linear-GELU-Linear.

    The main merger normalises each patch before concatenating; DeepStack mergers normalise the
    concatenated block (``postshuffle_norm``).
    """

    def __init__(self, args: VisionArgs, out_dim: int, postshuffle_norm: bool):
        super().__init__()
        self.hidden_dim = args.dim * args.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.hidden_dim if postshuffle_norm else args.dim, eps=args.norm_eps)
        self.linear_fc1 = nn.Linear(self.hidden_dim, self.hidden_dim)
        self.linear_fc2 = nn.Linear(self.hidden_dim, out_dim)

    def forward(self, x_NLD: torch.Tensor) -> torch.Tensor:
        """[N, L, D] -> [N * L / m^2, out_dim], image-major."""
        if self.postshuffle_norm:
            x = self.norm(x_NLD.reshape(-1, self.hidden_dim))
        else:
            x = self.norm(x_NLD).reshape(-1, self.hidden_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs, out_dim: int):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args)
        self.pos_embed = nn.Embedding(args.num_position_embeddings, args.dim)
        self.layers = nn.ModuleDict({str(i): VisionBlock(args) for i in range(args.n_layers)})
        self.merger = PatchMerger(args, out_dim, postshuffle_norm=False)
        # keyed by DeepStack level (0 feeds decoder layer 0), as HF numbers deepstack_merger_list
        self.deepstack_mergers = nn.ModuleDict({str(j): PatchMerger(args, out_dim, postshuffle_norm=True)
                                                for j in range(len(args.deepstack_layers))})
        # 2-D rotary: a quarter of the head dim of frequencies for h, the same for w
        self.register_buffer("inv_freq", self._rope_inv_freq(), persistent=False)

    def _rope_inv_freq(self) -> torch.Tensor:
        return rope_inv_freq(self.args.dim // self.args.n_heads // 2, self.args.rope_theta)

    def position_embeddings(self, grid_NL3: torch.Tensor) -> torch.Tensor:
        """The learned table resampled to each image's (h, w) grid, read at each patch: [N, L, D]."""
        side = self.args.pos_embed_side
        hw_NL2 = visual_item_hw(grid_NL3)
        h_taps, h_w = align_corners_taps(grid_NL3[..., 1], hw_NL2[..., 0], side)
        w_taps, w_w = align_corners_taps(grid_NL3[..., 2], hw_NL2[..., 1], side)
        index_NL4 = (h_taps[..., :, None] * side + w_taps[..., None, :]).flatten(-2)
        weight_NL4 = (h_w[..., :, None] * w_w[..., None, :]).flatten(-2)
        table = self.pos_embed.weight
        return (table[index_NL4] * weight_NL4[..., None].to(table.dtype)).sum(-2)

    def forward(self, pixels_NLD: torch.Tensor, grid_NL3: torch.Tensor,
                frame_lengths_NF: torch.Tensor | None = None):
        """Merged embeddings [N * L / m^2, out_dim] and one such tensor per DeepStack layer.
        frame_lengths_NF: each slot's visual item (and padding) lengths, for the varlen backend."""
        h = self.patch_embed(pixels_NLD)
        h = h + self.position_embeddings(grid_NL3).to(h.dtype)
        cos, sin = rope_2d_cos_sin(grid_NL3, self.inv_freq)
        # each frame of each image attends to itself; padding patches form one more segment
        mask = segment_mask(visual_item_ids(grid_NL3), causal=False, backend=self.args.attention_backend,
                            segment_lengths_BK=frame_lengths_NF)
        deepstack = []
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, mask)
            if int(name) in self.args.deepstack_layers:
                level = self.args.deepstack_layers.index(int(name))
                deepstack.append(self.deepstack_mergers[str(level)](h))
        return self.merger(h), deepstack

    @torch.no_grad()
    def init_weights(self):
        self.inv_freq.copy_(self._rope_inv_freq())
        std = self.args.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.patch_embed.weight, std=std)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.pos_embed.weight, std=std)


class Qwen3VLModel(nn.Module):
    def __init__(self, args: Qwen3VLArgs):
        super().__init__()
        self.args = args
        self.vision = VisionTransformer(args.vision, args.decoder.dim)
        self.decoder = Decoder(args.decoder)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, grid_thw: torch.Tensor | None = None,
                image_token_index: torch.Tensor | None = None,
                document_lengths: torch.Tensor | None = None,
                frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/document_ids/image_token_index [B, S]; position_ids [B, 3, S];
        pixel_values [N, L, D]; grid_thw [N, L, 3]; document_lengths [B, K] and frame_lengths
        [N, F] for the varlen attention backend. Returns the final hidden states [B, S, D].

        A later pipeline stage has no vision encoder: it gets the previous stage's hidden states
        [B, S, D] in place of input_ids, and no media."""
        if self.vision is None:
            return self.decoder(input_ids, position_ids, document_ids, document_lengths=document_lengths)
        h_BSD = self.decoder.tok_embeddings(input_ids)
        embeds_MD, deepstack_MD = self.vision(pixel_values, grid_thw, frame_lengths)
        positions_M = image_token_positions(image_token_index, embeds_MD.shape[0])
        h_BSD = scatter_image_embeddings(h_BSD, embeds_MD, positions_M)
        # DeepStack: each feature is added at the visual tokens only, zero elsewhere
        zeros_BSD = torch.zeros_like(h_BSD)
        additions = [scatter_image_embeddings(zeros_BSD, f, positions_M) for f in deepstack_MD]
        return self.decoder(h_BSD, position_ids, document_ids, additions, document_lengths)

    def init_weights(self):
        if self.vision is not None:  # else a later pipeline stage
            self.vision.init_weights()
        self.decoder.init_weights()


def training_flops(args: Qwen3VLArgs, shape: BatchShape) -> float:
    """Matmul FLOPs of one training step (3 x forward) over valid tokens and patches.

    Decoder attention counts causal (bidirectional: all) pairs inside each document; ViT attention
    full pairs inside each visual item (an image, or one frame of a video).
    """
    d, v = args.decoder, args.vision
    q_dim, kv_dim = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    decoder_linear = d.n_layers * (2 * d.dim * q_dim + 2 * d.dim * kv_dim + 3 * d.dim * d.ffn_hidden_dim)
    decoder_linear += d.dim * d.vocab_size
    vit_linear = v.patch_dim * v.dim + v.n_layers * (4 * v.dim * v.dim + 2 * v.dim * v.ffn_hidden_dim)
    merge_area = v.spatial_merge_size ** 2
    hidden = v.dim * merge_area
    mergers = (1 + len(v.deepstack_layers)) * (hidden * hidden + hidden * d.dim)
    forward = (2 * decoder_linear * shape.tokens
               + 2 * vit_linear * shape.patches
               + 2 * mergers * shape.patches / merge_area
               + d.n_layers * (2 if d.causal else 4) * q_dim * shape.doc_len_sq_sum  # causal: half of 4 S^2
               + v.n_layers * 4 * v.dim * shape.image_patches_sq_sum)
    return 3.0 * forward

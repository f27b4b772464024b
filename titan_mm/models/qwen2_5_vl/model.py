"""Qwen2.5-VL: a ViT with 2-D rotary, window attention and SwiGLU -> 2x2 patch merger -> Qwen2.5
decoder with M-RoPE.

The ViT runs on the fixed N x L patch batch (several images a slot, patches in merge-block order,
``grid_NL3`` holding each patch's (t, h, w) coordinate within its image, -1 on padding). HF
reorders patches into window order and attends within cu_seqlens segments; here the same segments
(each frame of each image, each window of it) are masks over the merge-block order, built from
``grid_NL3`` with tensor ops, which gives the same math with fixed shapes and no host syncs.
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from titan_mm.data.batch import BatchShape
from titan_mm.data.image import VisionInputSpec
from titan_mm.models.attention import attend, segment_mask
from titan_mm.models.llama.model import Decoder, DecoderArgs, RMSNorm
from titan_mm.models.multimodal import image_token_positions, scatter_image_embeddings, visual_item_ids
from titan_mm.models.qwen2_5_vl.positions import mrope_position_ids
from titan_mm.models.rope import apply_rope, rope_2d_cos_sin

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionArgs:
    dim: int = 1280
    n_layers: int = 32
    n_heads: int = 16
    ffn_hidden_dim: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 112
    """Side of an attention window in pixels; window layers attend within (window / patch)^2 patches."""
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    """Layers attending over the whole frame instead of a window."""
    out_dim: int = 3584
    """Width of the merger's output (the decoder's dim)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    init_std: float = 0.02
    attention_backend: str = "sdpa"
    """Attention kernel (titan_mm/models/attention.py); set from model.attention_backend."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_patches(self) -> int:
        """Side of a window in patches: whole merge blocks, as HF cuts windows of merged patches."""
        return self.window_size // self.spatial_merge_size // self.patch_size * self.spatial_merge_size


@dataclass
class Qwen2_5_VLArgs:
    vision: VisionArgs = field(default_factory=VisionArgs)
    decoder: DecoderArgs = field(default_factory=DecoderArgs)
    tokens_per_second: int = 2
    """M-RoPE temporal ids per second of video (a video's temporal patches are
    tokens_per_second * seconds_per_temporal_patch ids apart)."""
    image_token_id: int = 151655
    """Token ids recorded in HF config.json (Qwen's by default; a checkpoint's own are kept when it
    is loaded); the model itself reads image_token_index."""
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @property
    def vision_input(self) -> VisionInputSpec:
        v = self.vision
        return VisionInputSpec(v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.image_mean,
                               v.image_std, v.in_channels,
                               positions_fn=functools.partial(mrope_position_ids, args=self),
                               position_dims=3)


def window_segment_ids(grid_NL3: torch.Tensor, window_patches: int) -> torch.Tensor:
    """[N, L]: one id per (visual item, window of window_patches^2 patches from the item's top
    left); -1 for padding. HF reorders patches into windows; segments over merge-block order are
    the same math."""
    item_NL = visual_item_ids(grid_NL3)
    _, h_NL, w_NL = grid_NL3.unbind(-1)
    # ids only need to differ within a slot: size them by the largest grid of the batch
    windows_per_row = 1 + w_NL.amax() // window_patches
    window_NL = (h_NL // window_patches) * windows_per_row + w_NL // window_patches
    item_windows = (1 + h_NL.amax() // window_patches) * windows_per_row
    return torch.where(item_NL >= 0, item_NL * item_windows + window_NL, -1)


class PatchEmbed(nn.Module):
    """A Linear over pre-cut patches (features ordered C, t, p, p). The weight keeps the shape of
    HF's stride-equals-kernel Conv3d [dim, C, t, p, p], so checkpoints map by renaming alone."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        p = args.patch_size
        self.weight = nn.Parameter(torch.empty(args.dim, args.in_channels, args.temporal_patch_size, p, p))

    def forward(self, pixels_NLD: torch.Tensor) -> torch.Tensor:
        return F.linear(pixels_NLD.to(self.weight.dtype), self.weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.head_dim = args.head_dim
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
    """SwiGLU with biases."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_hidden_dim)
        self.up_proj = nn.Linear(args.dim, args.ffn_hidden_dim)
        self.down_proj = nn.Linear(args.ffn_hidden_dim, args.dim)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs, full_attention: bool):
        super().__init__()
        self.full_attention = full_attention
        self.norm1 = RMSNorm(args.dim, args.norm_eps)
        self.attn = VisionAttention(args)
        self.norm2 = RMSNorm(args.dim, args.norm_eps)
        self.mlp = VisionMLP(args)

    def forward(self, x, cos, sin, frame_mask, window_mask):
        mask = frame_mask if self.full_attention else window_mask
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, concatenate each m x m block of patches (consecutive in merge-block order), then
    Linear-GELU-Linear to the decoder width."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.merged_dim = args.dim * args.spatial_merge_size ** 2
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.linear_1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.linear_2 = nn.Linear(self.merged_dim, args.out_dim)

    def forward(self, x_NLD: torch.Tensor) -> torch.Tensor:
        """[N, L, D] -> [N * L / m^2, out_dim], image-major."""
        x = self.norm(x_NLD).reshape(-1, self.merged_dim)  # (N L/m^2) (m^2 D)
        return self.linear_2(F.gelu(self.linear_1(x)))


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args)
        self.layers = nn.ModuleDict({str(i): VisionBlock(args, i in args.fullatt_block_indexes)
                                     for i in range(args.n_layers)})
        self.merger = PatchMerger(args)
        self.register_buffer("inv_freq", self._rope_inv_freq(), persistent=False)

    def _rope_inv_freq(self) -> torch.Tensor:
        """head_dim / 4 frequencies, shared by the row and column axes."""
        half = self.args.head_dim // 2
        return 1.0 / self.args.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)

    def forward(self, pixels_NLD: torch.Tensor, grid_NL3: torch.Tensor,
                frame_lengths_NF: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [N, L, patch_dim], grid [N, L, 3] -> merged embeddings [N * L / m^2, out_dim].
        frame_lengths_NF: each slot's visual item (and padding) lengths, for the varlen backend."""
        h = self.patch_embed(pixels_NLD)
        cos, sin = rope_2d_cos_sin(grid_NL3, self.inv_freq)
        backend = self.args.attention_backend
        # full-attention layers: each frame of each image attends to itself
        frame_mask = segment_mask(visual_item_ids(grid_NL3), causal=False, backend=backend,
                                  segment_lengths_BK=frame_lengths_NF)
        # windows are not contiguous in merge-block order, which varlen needs: dense masks there
        window_mask = segment_mask(window_segment_ids(grid_NL3, self.args.window_patches), causal=False,
                                   backend="sdpa" if backend == "varlen" else backend)
        for layer in self.layers.values():
            h = layer(h, cos, sin, frame_mask, window_mask)
        return self.merger(h)

    @torch.no_grad()
    def init_weights(self):
        self.inv_freq.copy_(self._rope_inv_freq())
        std = self.args.init_std
        nn.init.trunc_normal_(self.patch_embed.weight, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.init_weights()


class Qwen2_5_VLModel(nn.Module):
    def __init__(self, args: Qwen2_5_VLArgs):
        super().__init__()
        self.args = args
        self.vision = VisionTransformer(args.vision)
        self.decoder = Decoder(args.decoder)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, grid_thw: torch.Tensor | None = None,
                image_token_index: torch.Tensor | None = None,
                document_lengths: torch.Tensor | None = None,
                frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/document_ids/image_token_index [B, S]; position_ids [B, 3, S] (M-RoPE);
        pixel_values [N, L, D]; grid_thw [N, L, 3]; document_lengths [B, K] and frame_lengths
        [N, F] for the varlen attention backend. Returns the final hidden states [B, S, D].

        A later pipeline stage has no vision encoder: it gets the previous stage's hidden states
        [B, S, D] in place of input_ids, and no media."""
        if self.vision is None:
            return self.decoder(input_ids, position_ids, document_ids, document_lengths=document_lengths)
        h_BSD = self.decoder.tok_embeddings(input_ids)
        image_embeds_MD = self.vision(pixel_values, grid_thw, frame_lengths)
        positions_M = image_token_positions(image_token_index, image_embeds_MD.shape[0])
        h_BSD = scatter_image_embeddings(h_BSD, image_embeds_MD, positions_M)
        return self.decoder(h_BSD, position_ids, document_ids, document_lengths=document_lengths)

    def init_weights(self):
        if self.vision is not None:  # else a later pipeline stage
            self.vision.init_weights()
        self.decoder.init_weights()


def training_flops(args: Qwen2_5_VLArgs, shape: BatchShape) -> float:
    """Matmul FLOPs of one training step (3 x forward) over valid tokens and patches.

    Decoder attention counts causal (bidirectional: all) pairs inside each document. ViT
    full-attention layers count all pairs inside each visual item (an image, or one frame of a
    video); window layers count one full window per patch (an upper bound at image borders).
    Padding is not counted.
    """
    d, v = args.decoder, args.vision
    q_dim, kv_dim = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    decoder_linear = d.n_layers * (2 * d.dim * q_dim + 2 * d.dim * kv_dim + 3 * d.dim * d.ffn_hidden_dim)
    decoder_linear += d.dim * d.vocab_size
    vit_linear = v.patch_dim * v.dim + v.n_layers * (4 * v.dim * v.dim + 3 * v.dim * v.ffn_hidden_dim)
    merge_area = v.spatial_merge_size ** 2
    merged = v.dim * merge_area
    merger = merged * merged + merged * v.out_dim
    n_full = len(v.fullatt_block_indexes)
    vit_attention = 4 * v.dim * (n_full * shape.image_patches_sq_sum
                                 + (v.n_layers - n_full) * shape.patches * v.window_patches ** 2)
    forward = (2 * decoder_linear * shape.tokens
               + 2 * vit_linear * shape.patches
               + 2 * merger * shape.patches / merge_area
               + d.n_layers * (2 if d.causal else 4) * q_dim * shape.doc_len_sq_sum  # causal: half of 4 S^2
               + vit_attention)
    return 3.0 * forward

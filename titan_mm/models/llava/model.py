"""LLaVA-style vision-language model: SigLIP2-style ViT -> projector -> Llama/Qwen decoder.

The ViT runs on every rank's fixed N x L patch batch (all-padding images included), so every rank
issues the same collectives whatever its data. Valid merged-patch embeddings are placed at image
tokens by an index the dataloader computed, so the forward has no host syncs.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from titan_mm.data.batch import BatchShape
from titan_mm.data.image import VisionInputSpec
from titan_mm.models.llama.model import Decoder, DecoderArgs
from titan_mm.models.multimodal import image_token_positions, scatter_image_embeddings
from titan_mm.models.siglip2.model import VisionArgs, VisionTransformer


@dataclass
class LlavaArgs:
    vision: VisionArgs = field(default_factory=VisionArgs)
    decoder: DecoderArgs = field(default_factory=DecoderArgs)
    spatial_merge_size: int = 2
    """m: each m x m block of patches becomes one image token (1 = no merge)."""
    projector_hidden_dim: int = 512
    projector_norm: bool = True
    """LayerNorm the ViT output before the projector (HF LlavaMultiModalProjector has none)."""
    image_token_id: int = -1
    """Id of the image placeholder token, recorded in HF config.json (the model itself reads
    image_token_index)."""

    @property
    def vision_input(self) -> VisionInputSpec:
        v = self.vision
        return VisionInputSpec(v.patch_size, v.temporal_patch_size, self.spatial_merge_size,
                               v.image_mean, v.image_std, v.in_channels, v.channels_last)


class Projector(nn.Module):
    """[LayerNorm,] concatenate each m x m block of patches, then Linear-GELU-Linear to the decoder
    width. With m = 1 and no norm it is HF's LlavaMultiModalProjector.

    Patches arrive in merge-block order (the m*m patches of a block are consecutive), so the merge
    is a reshape.
    """

    def __init__(self, vision_dim: int, merge: int, hidden_dim: int, out_dim: int, eps: float,
                 norm: bool = True):
        super().__init__()
        self.merge_area = merge * merge
        self.norm = nn.LayerNorm(vision_dim, eps=eps) if norm else None
        self.linear_1 = nn.Linear(vision_dim * self.merge_area, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x_NLD: torch.Tensor) -> torch.Tensor:
        """[N, L, D_vision] -> [N * L / m^2, D_text], image-major."""
        x = self.norm(x_NLD) if self.norm is not None else x_NLD
        x = x.reshape(-1, self.merge_area * x.shape[-1])  # (N L/m^2) (m^2 D)
        return self.linear_2(F.gelu(self.linear_1(x)))

    @torch.no_grad()
    def init_weights(self, std: float):
        if self.norm is not None:
            nn.init.ones_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)
        for lin in (self.linear_1, self.linear_2):
            nn.init.trunc_normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)


class LlavaModel(nn.Module):
    def __init__(self, args: LlavaArgs):
        super().__init__()
        self.args = args
        self.vision = VisionTransformer(args.vision)
        self.projector = Projector(args.vision.dim, args.spatial_merge_size, args.projector_hidden_dim,
                                   args.decoder.dim, args.vision.norm_eps, args.projector_norm)
        self.decoder = Decoder(args.decoder)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, grid_thw: torch.Tensor | None = None,
                image_token_index: torch.Tensor | None = None,
                document_lengths: torch.Tensor | None = None,
                frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/position_ids/document_ids/image_token_index [B, S]; pixel_values [N, L, D];
        grid_thw [N, L, 3]; document_lengths [B, K] and frame_lengths [N, F] for the varlen
        attention backend. Returns the final hidden states [B, S, D].

        A later pipeline stage has no vision encoder: it gets the previous stage's hidden states
        [B, S, D] in place of input_ids, and no media."""
        if self.vision is None:
            return self.decoder(input_ids, position_ids, document_ids, document_lengths=document_lengths)
        h_BSD = self.decoder.tok_embeddings(input_ids)
        image_embeds_MD = self.encode_images(pixel_values, grid_thw, frame_lengths)
        positions_M = image_token_positions(image_token_index, image_embeds_MD.shape[0])
        h_BSD = scatter_image_embeddings(h_BSD, image_embeds_MD, positions_M)
        return self.decoder(h_BSD, position_ids, document_ids, document_lengths=document_lengths)

    def encode_images(self, pixel_values_NLD, grid_NL3, frame_lengths_NF=None) -> torch.Tensor:
        """Merged image embeddings [N * L / m^2, decoder dim], image-slot major."""
        return self.projector(self.vision(pixel_values_NLD, grid_NL3, frame_lengths_NF))

    def init_weights(self):
        if self.vision is not None:  # else a later pipeline stage
            self.vision.init_weights()
            self.projector.init_weights(self.args.vision.init_std)
        self.decoder.init_weights()


def training_flops(args: LlavaArgs, shape: BatchShape) -> float:
    """Matmul FLOPs of one training step (3 x forward) over valid tokens and patches.

    Attention counts causal (bidirectional: all) pairs inside each document for the decoder and
    full pairs inside each image for the ViT; padding is not counted.
    """
    d, v = args.decoder, args.vision
    q_dim, kv_dim = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    decoder_linear = d.n_layers * (2 * d.dim * q_dim + 2 * d.dim * kv_dim + 3 * d.dim * d.ffn_hidden_dim)
    decoder_linear += d.dim * d.vocab_size
    vit_linear = v.patch_dim * v.dim + v.n_layers * (4 * v.dim * v.dim + 2 * v.dim * v.ffn_hidden_dim)
    merge_area = args.spatial_merge_size ** 2
    projector = v.dim * merge_area * args.projector_hidden_dim + args.projector_hidden_dim * d.dim
    forward = (2 * decoder_linear * shape.tokens
               + 2 * vit_linear * shape.patches
               + 2 * projector * shape.patches / merge_area
               + d.n_layers * (2 if d.causal else 4) * q_dim * shape.doc_len_sq_sum  # causal: half of 4 S^2
               + v.n_layers * 4 * v.dim * shape.image_patches_sq_sum)
    return 3.0 * forward

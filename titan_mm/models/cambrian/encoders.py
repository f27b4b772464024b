"""The vision encoders a Cambrian model can combine, each on fixed-size square images.

Every encoder maps its images [N, 3, R, R] to (a feature grid [N, h, w, C], its class token
[N, C] or None); Cambrian reads the grid (patch tokens). ``ENCODERS`` maps an encoder kind to
what the family needs of it: how to build it from its own args, its feature width, its forward
FLOPs per image, its tensor-parallel plan and the sizes that plan splits, and its HF key map.
Each built encoder holds its transformer blocks in ``layers`` (activation checkpointing, compile
and FSDP units).
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from titan_mm.models.attention import AttentionMask
from titan_mm.models.clip.hf_adapter import clip_key_map
from titan_mm.models.clip.model import CLIPVisionEncoder
from titan_mm.models.clip.parallelize import apply_tp_clip, clip_tensor_parallel_sizes
from titan_mm.models.dinov2.hf_adapter import dinov2_fused_key_map, dinov2_key_map
from titan_mm.models.dinov2.model import Dinov2Encoder
from titan_mm.models.dinov2.parallelize import apply_tp_dinov2, dinov2_tensor_parallel_sizes
from titan_mm.models.image_vit import vit_forward_flops
from titan_mm.models.siglip2.hf_adapter import vision_key_map
from titan_mm.models.siglip2.model import VisionArgs, VisionTransformer


@dataclass
class EncoderArgs:
    kind: str = "siglip2"
    """Which encoder: a key of ENCODERS (siglip2, clip, dinov2)."""
    vision: object = field(default_factory=VisionArgs)
    """The encoder's own args dataclass (siglip2: siglip2.model.VisionArgs; clip:
    clip.model.CLIPVisionArgs; dinov2: dinov2.model.Dinov2Args)."""
    image_size: int = 64
    """R: images are padded to a square and resized to R x R for this encoder."""
    window: int = 1
    """w: each image token's window is w x w features of this encoder, so the feature grid is
    resized (bilinear) to (w G) x (w G) for a G x G query grid."""


class SigLIP2Encoder(VisionTransformer):
    """SigLIP2 ViT (titan_mm/models/siglip2) on square images; parameter names are the ViT's."""

    def __init__(self, args: VisionArgs, image_size: int):
        super().__init__(args)
        self.side = image_size // args.patch_size

    def forward(self, images_N3HW: torch.Tensor) -> tuple[torch.Tensor, None]:
        """[N, 3, R, R] -> ([N, h, w, dim], no class token); pixels past the last whole patch are
        dropped, as SigLIP's stride-p convolution drops them (384 px at patch 14: 27 x 27)."""
        N, p, side = images_N3HW.shape[0], self.args.patch_size, self.side
        x = images_N3HW[:, :, :side * p, :side * p].reshape(N, 3, side, p, side, p)
        # N C h p w p -> N h w (p p C) or N h w (C p p)
        x = x.permute(0, 2, 4, 3, 5, 1) if self.args.channels_last else x.permute(0, 2, 4, 1, 3, 5)
        h = self.patch_embed(x.reshape(N, side * side, -1).to(self.patch_embed.weight.dtype))
        hh, ww = torch.meshgrid(torch.arange(side, device=h.device), torch.arange(side, device=h.device),
                                indexing="ij")
        grid_1L3 = torch.stack([torch.zeros_like(hh), hh, ww], -1).view(1, -1, 3)
        h = h + self.position_embeddings(grid_1L3).to(h.dtype)
        # every patch sees its whole image: sdpa without a mask (flash kernels on a GPU)
        mask = AttentionMask(backend="sdpa")
        for layer in self.layers.values():
            h = layer(h, mask)
        if self.args.apply_post_layernorm:
            h = self.post_layernorm(h)
        return h.view(N, side, side, -1), None


def apply_tp_siglip2(encoder: SigLIP2Encoder, tp_mesh: DeviceMesh):
    """Heads and MLP units split; the stream between blocks stays whole (no sequence split, so any
    patch count works: 729 at 384 px, patch 14)."""
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.out_proj": RowwiseParallel(),
            "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}
    for block in encoder.layers.values():
        parallelize_module(block, tp_mesh, plan)


def siglip2_flops_per_image(args: VisionArgs, image_size: int) -> int:
    patches = (image_size // args.patch_size) ** 2
    return vit_forward_flops(tokens=patches, patches=patches, patch_dim=args.patch_dim, dim=args.dim,
                             n_layers=args.n_layers, mlp_matrices_params=2 * args.dim * args.ffn_hidden_dim)


@dataclass(frozen=True)
class EncoderKind:
    build: Callable[[object, int], nn.Module]
    """(args, image size) -> the encoder module."""
    feature_dim: Callable[[object], int]
    flops_per_image: Callable[[object, int], int]
    """(args, image size) -> matmul FLOPs of one image's forward."""
    apply_tp: Callable[[nn.Module, DeviceMesh], None]
    tensor_parallel_sizes: Callable[[object], dict[str, int]]
    hf_key_map: Callable[[str, str], list[tuple[str, str]]]
    """(HF prefix of the encoder, our prefix) -> its (titan_mm regex, HF template) pairs."""
    hf_fused_key_map: Callable[[str, str], list] = lambda hf_prefix, ours_prefix: []


def build_clip(args, image_size: int) -> CLIPVisionEncoder:
    """CLIP reads images of its position table's size unless told to resize the table."""
    if image_size != args.image_size and not args.interpolate_pos_encoding:
        raise ValueError(f"a CLIP encoder reads {args.image_size} px images; set EncoderArgs.image_size to it "
                         f"(or interpolate_pos_encoding in its args)")
    return CLIPVisionEncoder(args)


ENCODERS: dict[str, EncoderKind] = {
    "siglip2": EncoderKind(
        build=SigLIP2Encoder, feature_dim=lambda a: a.dim, flops_per_image=siglip2_flops_per_image,
        apply_tp=apply_tp_siglip2,
        tensor_parallel_sizes=lambda a: {"siglip2 n_heads": a.n_heads, "siglip2 ffn_hidden_dim": a.ffn_hidden_dim},
        # Siglip2VisionModel's names (its vision_model.)
        hf_key_map=lambda hf, ours: vision_key_map(hf + "vision_model.", ours)),
    "clip": EncoderKind(
        build=build_clip, feature_dim=lambda a: a.dim,
        flops_per_image=lambda a, size: a.flops_per_image(size, size), apply_tp=apply_tp_clip,
        tensor_parallel_sizes=clip_tensor_parallel_sizes,
        hf_key_map=lambda hf, ours: clip_key_map(hf + "vision_model.", ours)),
    "dinov2": EncoderKind(
        build=lambda args, size: Dinov2Encoder(args), feature_dim=lambda a: a.dim,
        flops_per_image=lambda a, size: a.flops_per_image(size, size), apply_tp=apply_tp_dinov2,
        tensor_parallel_sizes=dinov2_tensor_parallel_sizes, hf_key_map=dinov2_key_map,
        hf_fused_key_map=dinov2_fused_key_map),
}


def build_encoder(e: EncoderArgs) -> nn.Module:
    if e.kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {e.kind!r}; available: {sorted(ENCODERS)}")
    return ENCODERS[e.kind].build(e.vision, e.image_size)

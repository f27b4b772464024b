"""The vision encoders a Cambrian model can combine, each on fixed-size square images.

Every encoder maps its images [N, 3, R, R] to a feature grid [N, h, w, C] (class and register
tokens dropped; Cambrian reads the patch tokens). ``ENCODERS`` maps an encoder kind to its class,
each built from its own args dataclass; each kind also names its transformer blocks (``layers``,
for activation checkpointing, compile and FSDP) and its tensor-parallel plan.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from titan_mm.models.attention import AttentionMask
from titan_mm.models.siglip2.hf_adapter import vision_key_map
from titan_mm.models.siglip2.model import VisionArgs, VisionTransformer


@dataclass
class EncoderArgs:
    kind: str = "siglip2"
    """Which encoder: a key of ENCODERS."""
    vision: object = field(default_factory=VisionArgs)
    """The encoder's own args dataclass (siglip2: titan_mm.models.siglip2.model.VisionArgs)."""
    image_size: int = 64
    """R: images are padded to a square and resized to R x R for this encoder."""
    window: int = 1
    """w: each image token's window is w x w features of this encoder, so the feature grid is
    resized (bilinear) to (w G) x (w G) for a G x G query grid."""


def full_attention() -> AttentionMask:
    """Every patch sees every patch of its image (fixed-size images, no padding): sdpa without a
    mask, which runs flash kernels on a GPU."""
    return AttentionMask(backend="sdpa")


class SigLIP2Encoder(VisionTransformer):
    """SigLIP2 ViT (titan_mm/models/siglip2) on square images; parameter names are the ViT's."""

    def __init__(self, args: VisionArgs, image_size: int):
        super().__init__(args)
        self.side = image_size // args.patch_size

    @property
    def feature_dim(self) -> int:
        return self.feature_dim_of(self.args)

    def forward(self, images_N3HW: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] -> [N, h, w, dim]; pixels past the last whole patch are dropped, as a
        stride-p convolution does."""
        N, p, side = images_N3HW.shape[0], self.args.patch_size, self.side
        x = images_N3HW[:, :, :side * p, :side * p].reshape(N, 3, side, p, side, p)
        # N C h p w p -> N h w (p p C) or N h w (C p p)
        x = x.permute(0, 2, 4, 3, 5, 1) if self.args.channels_last else x.permute(0, 2, 4, 1, 3, 5)
        patches_NLD = x.reshape(N, side * side, -1)
        h = self.patch_embed(patches_NLD.to(self.patch_embed.weight.dtype))
        hh, ww = torch.meshgrid(torch.arange(side, device=h.device), torch.arange(side, device=h.device),
                                indexing="ij")
        grid_1L3 = torch.stack([torch.zeros_like(hh), hh, ww], -1).view(1, -1, 3)
        h = h + self.position_embeddings(grid_1L3).to(h.dtype)
        mask = full_attention()
        for layer in self.layers.values():
            h = layer(h, mask)
        if self.args.apply_post_layernorm:
            h = self.post_layernorm(h)
        return h.view(N, side, side, -1)

    @staticmethod
    def apply_tp(encoder: "SigLIP2Encoder", tp_mesh: DeviceMesh):
        """Heads and MLP units split; the stream between blocks stays whole (no sequence split,
        so any patch count works)."""
        plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.out_proj": RowwiseParallel(),
                "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}
        for block in encoder.layers.values():
            parallelize_module(block, tp_mesh, plan)

    @staticmethod
    def tensor_parallel_sizes(args: VisionArgs) -> dict[str, int]:
        return {"n_heads": args.n_heads, "ffn_hidden_dim": args.ffn_hidden_dim}

    @staticmethod
    def hf_key_map(hf_prefix: str, ours_prefix: str) -> list[tuple[str, str]]:
        """Siglip2VisionModel's names under ``hf_prefix`` (its ``vision_model.``)."""
        return vision_key_map(hf_prefix + "vision_model.", ours_prefix)

    @staticmethod
    def feature_dim_of(args: VisionArgs) -> int:
        return args.dim

    @staticmethod
    def forward_macs(args: VisionArgs, image_size: int) -> tuple[int, int]:
        """(multiply-adds of the linear layers, of attention) of one image's forward."""
        L = (image_size // args.patch_size) ** 2
        block = 4 * args.dim ** 2 + 2 * args.dim * args.ffn_hidden_dim
        return L * (args.patch_dim * args.dim + args.n_layers * block), args.n_layers * 2 * args.dim * L * L


ENCODERS: dict[str, type] = {"siglip2": SigLIP2Encoder}
"""Encoder kind -> class (constructor (args, image_size); forward [N, 3, R, R] -> [N, h, w, C])."""


def build_encoder(e: EncoderArgs) -> nn.Module:
    if e.kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {e.kind!r}; available: {sorted(ENCODERS)}")
    return ENCODERS[e.kind](e.vision, e.image_size)

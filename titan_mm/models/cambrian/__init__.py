"""Cambrian family: several vision encoders + Spatial Vision Aggregator + Llama / Qwen decoder
(docs/cambrian.md)."""

import dataclasses

from torch import nn

from titan_mm.models import ModelSpec, ParamPolicy
from titan_mm.models.cambrian.encoders import EncoderArgs
from titan_mm.models.clip import FLAVORS as CLIP_FLAVORS
from titan_mm.models.clip.model import CLIPVisionArgs
from titan_mm.models.dinov2 import FLAVORS as DINOV2_FLAVORS
from titan_mm.models.dinov2.model import Dinov2Args
from titan_mm.models.image_vit import PatchEmbed
from titan_mm.models.llava import QWEN_IMAGE_PAD_ID
from titan_mm.models.cambrian.model import CambrianArgs, CambrianModel, training_flops
from titan_mm.models.cambrian.parallelize import (parallelize_cambrian, pipeline_first_stage_layers,
                                                  tensor_parallel_sizes)
from titan_mm.models.llama import FLAVORS as TEXT_FLAVORS
from titan_mm.models.siglip2.model import VisionArgs

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

_DEBUG_SVA = dict(decoder=TEXT_FLAVORS["debug"].decoder, query_side=4, sva_dim=64, sva_heads=4, aggregator_layers=1,
                  decoder_sva_layers=(0, 1), image_token_id=4)

FLAVORS = {
    # ~4M parameters, one encoder of each kind at its own width, patch size, image size and
    # normalisation: SigLIP2's 8 x 8 grid gives 2 x 2 windows of the 4 x 4 query grid; CLIP's 3 x 3
    # and DINOv2's 5 x 5 grids (with a register token) are resized to 4 x 4 (one feature a window);
    # SVA layers after decoder layers 0 and 1
    "debug": CambrianArgs(
        encoders=(
            EncoderArgs("siglip2", VisionArgs(dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=128, patch_size=8,
                                              pos_embed_side=8), image_size=64, window=2),
            EncoderArgs("clip", CLIPVisionArgs(dim=96, n_layers=3, n_heads=4, ffn_hidden_dim=192, patch_size=16,
                                               image_size=48), image_size=48, window=1),
            EncoderArgs("dinov2", Dinov2Args(dim=64, n_layers=2, n_heads=4, mlp_ratio=2, patch_size=8, image_size=64,
                                             num_register_tokens=1), image_size=40, window=1),
        ), **_DEBUG_SVA),
    # two SigLIP2-style encoders (the second with CLIP's normalisation)
    "debug-siglip2x2": CambrianArgs(
        encoders=(
            EncoderArgs("siglip2", VisionArgs(dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=128, patch_size=8,
                                              pos_embed_side=8), image_size=64, window=2),
            EncoderArgs("siglip2", VisionArgs(dim=96, n_layers=2, n_heads=4, ffn_hidden_dim=192, patch_size=16,
                                              pos_embed_side=4, image_mean=CLIP_MEAN, image_std=CLIP_STD),
                        image_size=48, window=1),
        ), **_DEBUG_SVA),
}
# Cambrian-1's design at real size: SigLIP2-so400m/14 at 384 px (27 x 27), CLIP ViT-L/14 at 336 px
# (24 x 24, penultimate layer), DINOv2-L/14 at 378 px (27 x 27), each grid resized to the 24 x 24
# query grid (one feature a window, as the released models' 576-token towers); C = 1024, 16 heads,
# 3 aggregator layers, SVA after decoder layers 0, 3, ..., 27 (start 0, stride 3, 10 layers)
FLAVORS["siglip2-so400m-clip-l-dinov2-l-qwen3-8b"] = CambrianArgs(
    encoders=(
        EncoderArgs("siglip2", VisionArgs(dim=1152, n_layers=27, n_heads=16, ffn_hidden_dim=4304, patch_size=14,
                                          pos_embed_side=27, channels_last=True, apply_post_layernorm=False),
                    image_size=384, window=1),
        EncoderArgs("clip", CLIP_FLAVORS["vit-l-14-336"], image_size=336, window=1),
        EncoderArgs("dinov2", DINOV2_FLAVORS["vit-l-14"], image_size=378, window=1),
    ),
    decoder=TEXT_FLAVORS["qwen3-8b"].decoder, query_side=24, sva_dim=1024, sva_heads=16, aggregator_layers=3,
    decoder_sva_layers=tuple(range(0, 30, 3)), image_token_id=QWEN_IMAGE_PAD_ID)

# the same towers and aggregator on Qwen3-4B: the largest that trains on one 80 GB GPU without FSDP
FLAVORS["siglip2-so400m-clip-l-dinov2-l-qwen3-4b"] = dataclasses.replace(
    FLAVORS["siglip2-so400m-clip-l-dinov2-l-qwen3-8b"], decoder=TEXT_FLAVORS["qwen3-4b"].decoder)

# the debug model with its own output head, which pipeline parallelism needs
FLAVORS["debug-untied"] = dataclasses.replace(
    FLAVORS["debug"], decoder=dataclasses.replace(FLAVORS["debug"].decoder, tie_embeddings=False))

SPEC = ModelSpec(name="cambrian", flavors=FLAVORS, model_cls=CambrianModel, parallelize=parallelize_cambrian,
                 training_flops=training_flops, tensor_parallel_sizes=tensor_parallel_sizes,
                 pipeline_first_stage_layers=pipeline_first_stage_layers,
                 # the towers are the vision encoder; the SVA (aggregator layers, queries, the decoder's
                 # SVA layers), the per-tower projections and the projection to the decoder are the projector
                 param_policy=ParamPolicy(
                     module_groups={"vision": ("vision.encoders",),
                                    "projector": ("vision.projections", "vision.queries", "vision.layers",
                                                  "vision.image_newline", "vision.projector_1", "vision.projector_2",
                                                  "decoder_sva"),
                                    "decoder": ("decoder",)},
                     matrix_modules=(nn.Linear, PatchEmbed)))

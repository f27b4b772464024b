"""Qwen3-VL family: ViT with 2-D rotary and DeepStack mergers + Qwen3 decoder with interleaved M-RoPE."""

import dataclasses

from torch import nn

from titan_mm.models import ModelSpec, ParamPolicy
from titan_mm.models.llama.model import DecoderArgs
from titan_mm.models.llama.parallelize import vlm_tensor_parallel_sizes
from titan_mm.models.qwen3_vl.hf_adapter import Qwen3VLAdapter
from titan_mm.models.qwen3_vl.model import PatchEmbed, Qwen3VLArgs, Qwen3VLModel, VisionArgs, training_flops
from titan_mm.models.qwen3_vl.parallelize import parallelize_qwen3_vl, pipeline_first_stage_layers

# the two ViT shapes of the released checkpoints: 24 x 1024 (2B, 4B) and 27 x 1152 (8B, 32B)
_SMALL_VIT = VisionArgs(dim=1024, n_layers=24, n_heads=16, ffn_hidden_dim=4096, deepstack_layers=(5, 11, 17))
_LARGE_VIT = VisionArgs(dim=1152, n_layers=27, n_heads=16, ffn_hidden_dim=4304, deepstack_layers=(8, 16, 24))


def _published(vision: VisionArgs, dim: int, n_layers: int, n_heads: int, ffn: int, tie: bool) -> Qwen3VLArgs:
    """The released decoders share head_dim 128, 8 KV heads, the vocabulary and the rotary setup."""
    return Qwen3VLArgs(vision=dataclasses.replace(vision), decoder=DecoderArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, head_dim=128, ffn_hidden_dim=ffn,
        vocab_size=151936, norm_eps=1e-6, rope_theta=5_000_000.0, qk_norm=True, tie_embeddings=tie,
        mrope_section=(24, 20, 20), mrope_interleaved=True, max_position_embeddings=262144))


FLAVORS = {
    # ~4M parameters with the bundled 512-token tokenizer (ids: image_start 3, image_pad 4,
    # image_end 5); 8-pixel patches so the bundled 32-128 px images give 4-16 patches a side
    "debug": Qwen3VLArgs(
        vision=VisionArgs(dim=64, n_layers=4, n_heads=4, ffn_hidden_dim=256, patch_size=8,
                          num_position_embeddings=64, deepstack_layers=(0, 1, 2)),
        decoder=DecoderArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, ffn_hidden_dim=768,
                            vocab_size=512, qk_norm=True, tie_embeddings=True, mrope_section=(12, 10, 10),
                            mrope_interleaved=True),
        image_token_id=4, video_token_id=-1, vision_start_token_id=3, vision_end_token_id=5),
    "2B": _published(_SMALL_VIT, dim=2048, n_layers=28, n_heads=16, ffn=6144, tie=True),
    "4B": _published(_SMALL_VIT, dim=2560, n_layers=36, n_heads=32, ffn=9728, tie=True),
    "8B": _published(_LARGE_VIT, dim=4096, n_layers=36, n_heads=32, ffn=12288, tie=False),
    "32B": _published(_LARGE_VIT, dim=5120, n_layers=64, n_heads=64, ffn=25600, tie=False),
}
# the debug model with its own output head, which pipeline parallelism needs (the head is on the
# last stage, the token embeddings on the first)
FLAVORS["debug-untied"] = dataclasses.replace(
    FLAVORS["debug"], decoder=dataclasses.replace(FLAVORS["debug"].decoder, tie_embeddings=False))

SPEC = ModelSpec(name="qwen3_vl", flavors=FLAVORS, model_cls=Qwen3VLModel, parallelize=parallelize_qwen3_vl,
                 training_flops=training_flops, hf_adapter=Qwen3VLAdapter(),
                 tensor_parallel_sizes=vlm_tensor_parallel_sizes,
                 pipeline_first_stage_layers=pipeline_first_stage_layers,
                 # the mergers (DeepStack's too) are the projector; the patch embedding is a Linear
                 # over pre-cut patches, held in Conv3d's shape
                 param_policy=ParamPolicy(module_groups={"vision": ("vision",),
                                                         "projector": ("vision.merger", "vision.deepstack_mergers"),
                                                         "decoder": ("decoder",)},
                                          matrix_modules=(nn.Linear, PatchEmbed)))

"""Qwen2.5-VL family: window-attention ViT with 2-D rotary + 2x2 patch merger + Qwen2.5 decoder
with M-RoPE."""

import dataclasses

from torch import nn

from titan_mm.models import ModelSpec, ParamPolicy
from titan_mm.models.llama.model import DecoderArgs
from titan_mm.models.llama.parallelize import vlm_tensor_parallel_sizes
from titan_mm.models.qwen2_5_vl.hf_adapter import Qwen2_5_VLAdapter
from titan_mm.models.qwen2_5_vl.model import (PatchEmbed, Qwen2_5_VLArgs, Qwen2_5_VLModel, VisionArgs,
                                              training_flops)
from titan_mm.models.qwen2_5_vl.parallelize import parallelize_qwen2_5_vl


def _released(vision_ffn: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn: int,
              vocab: int, tie: bool) -> Qwen2_5_VLArgs:
    """The released checkpoints share one 32-layer ViT (only its MLP width differs) and the decoder
    options; the dims are those of their config.json files."""
    return Qwen2_5_VLArgs(
        vision=VisionArgs(dim=1280, n_layers=32, n_heads=16, ffn_hidden_dim=vision_ffn, out_dim=dim),
        decoder=DecoderArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                            head_dim=128, ffn_hidden_dim=ffn, vocab_size=vocab, norm_eps=1e-6,
                            rope_theta=1e6, qkv_bias=True, tie_embeddings=tie, mrope_section=(16, 24, 24),
                            max_position_embeddings=128000),
        tokens_per_second=2)


FLAVORS = {
    # ~4M parameters with the bundled 512-token tokenizer: learns the bundled captions on a CPU
    "debug": Qwen2_5_VLArgs(
        vision=VisionArgs(dim=64, n_layers=4, n_heads=4, ffn_hidden_dim=128, window_size=56,
                          fullatt_block_indexes=(1, 3), out_dim=256),
        decoder=DecoderArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, ffn_hidden_dim=768,
                            vocab_size=512, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                            mrope_section=(8, 12, 12)),
        tokens_per_second=2),
    "3B": _released(3420, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn=11008, vocab=151936,
                    tie=True),
    "7B": _released(3420, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn=18944, vocab=152064,
                    tie=False),
    "32B": _released(3456, dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, ffn=27648, vocab=152064,
                     tie=False),
    "72B": _released(3456, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn=29568, vocab=152064,
                     tie=False),
}
# the debug model with its own output head, which pipeline parallelism needs (the head is on the
# last stage, the token embeddings on the first)
FLAVORS["debug-untied"] = dataclasses.replace(
    FLAVORS["debug"], decoder=dataclasses.replace(FLAVORS["debug"].decoder, tie_embeddings=False))

SPEC = ModelSpec(name="qwen2_5_vl", flavors=FLAVORS, model_cls=Qwen2_5_VLModel,
                 parallelize=parallelize_qwen2_5_vl, training_flops=training_flops,
                 hf_adapter=Qwen2_5_VLAdapter(), tensor_parallel_sizes=vlm_tensor_parallel_sizes,
                 # the patch embedding is a Linear over pre-cut patches, held in Conv3d's shape
                 param_policy=ParamPolicy(module_groups={"vision": ("vision",), "projector": ("vision.merger",),
                                                         "decoder": ("decoder",)},
                                          matrix_modules=(nn.Linear, PatchEmbed)))

"""HF Siglip2VisionModel weights and config <-> titan_mm's VisionTransformer, for the families
that embed it (LLaVA)."""

import math
import re

from titan_mm.models.siglip2.model import VisionArgs

_BLOCK_MODULES = ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def vision_key_map(hf_prefix: str, ours_prefix: str = "vision.") -> list[tuple[str, str]]:
    """(titan_mm regex, HF template) pairs; our block modules carry SigLIP2's own names."""
    ours = re.escape(ours_prefix)
    key_map = [(ours + r"patch_embed\.(?P<p>weight|bias)", hf_prefix + "embeddings.patch_embedding.{p}"),
               (ours + r"pos_embed", hf_prefix + "embeddings.position_embedding.weight"),
               (ours + r"post_layernorm\.(?P<p>weight|bias)", hf_prefix + "post_layernorm.{p}")]
    key_map += [(ours + rf"layers\.(?P<i>\d+)\.{re.escape(name)}\.(?P<p>weight|bias)",
                 hf_prefix + f"encoder.layers.{{i}}.{name}.{{p}}") for name in _BLOCK_MODULES]
    return key_map


def vision_hf_config(v: VisionArgs) -> dict:
    """A Siglip2VisionConfig dict (no pooling head: titan_mm does not build it)."""
    if not v.channels_last or v.temporal_patch_size != 1:
        raise ValueError("SigLIP2 checkpoints expect channels_last patches and temporal_patch_size=1")
    return {"model_type": "siglip2_vision_model", "hidden_size": v.dim, "intermediate_size": v.ffn_hidden_dim,
            "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads, "num_channels": v.in_channels,
            "num_patches": v.pos_embed_side ** 2, "patch_size": v.patch_size, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": v.norm_eps, "attention_dropout": 0.0, "vision_use_head": False}


def vision_args_from_hf_config(c: dict, apply_post_layernorm: bool) -> VisionArgs:
    if c.get("model_type") != "siglip2_vision_model":
        raise ValueError(f"vision model_type {c.get('model_type')!r} is not siglip2_vision_model")
    if c.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"SigLIP2 hidden_act {c['hidden_act']!r} is not implemented (gelu_pytorch_tanh is)")
    side = math.isqrt(c["num_patches"])
    if side * side != c["num_patches"]:
        raise ValueError(f"num_patches={c['num_patches']} is not a square position table")
    return VisionArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      ffn_hidden_dim=c["intermediate_size"], patch_size=c["patch_size"],
                      in_channels=c.get("num_channels", 3), pos_embed_side=side,
                      norm_eps=c.get("layer_norm_eps", 1e-6), channels_last=True,
                      apply_post_layernorm=apply_post_layernorm)

"""HF Dinov2Model / Dinov2WithRegistersModel weights and config <-> titan_mm's Dinov2Encoder.

Names are those of published DINOv2 checkpoints, which transformers 5 still writes
(``attention.attention.query``, the giant size's fused SwiGLU ``mlp.weights_in``). The mask token
(masked-image pre-training only) and the blocks past ``select_layer`` are not built, so they are
not read; an export holds the blocks built, and transformers initialises a missing mask token to
zeros.
"""

import re

from titan_mm.hf.adapter import HFAdapter
from titan_mm.models.dinov2.model import Dinov2Args

_BLOCK_RENAMES = [("norm1", "norm1"), ("norm2", "norm2"), ("attn.q_proj", "attention.attention.query"),
                  ("attn.k_proj", "attention.attention.key"), ("attn.v_proj", "attention.attention.value"),
                  ("attn.out_proj", "attention.output.dense"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                  ("mlp.down_proj", "mlp.weights_out")]


def dinov2_key_map(hf_prefix: str = "", ours_prefix: str = "") -> list[tuple[str, str]]:
    """(titan_mm regex, HF template) pairs of the tensors that map one to one."""
    ours = re.escape(ours_prefix)
    emb = hf_prefix + "embeddings."
    key_map = [(ours + r"patch_embed\.(?P<p>weight|bias)", emb + "patch_embeddings.projection.{p}"),
               (ours + r"cls_token", emb + "cls_token"),
               (ours + r"register_tokens", emb + "register_tokens"),
               (ours + r"pos_embed", emb + "position_embeddings"),
               (ours + r"norm\.(?P<p>weight|bias)", hf_prefix + "layernorm.{p}")]
    key_map += [(ours + rf"layers\.(?P<i>\d+)\.{re.escape(name)}\.(?P<p>weight|bias)",
                 hf_prefix + f"encoder.layer.{{i}}.{theirs}.{{p}}") for name, theirs in _BLOCK_RENAMES]
    key_map += [(ours + rf"layers\.(?P<i>\d+)\.layer_scale(?P<k>[12])\.lambda1",
                 hf_prefix + "encoder.layer.{i}.layer_scale{k}.lambda1")]
    return key_map


def dinov2_fused_key_map(hf_prefix: str = "", ours_prefix: str = "") -> list[tuple[str, str, tuple[str, ...]]]:
    """SwiGLU's gate and up projections, one weights_in tensor in HF checkpoints (gate first)."""
    return [(re.escape(ours_prefix) + r"layers\.(?P<i>\d+)\.mlp\.(?P<part>gate|up)_proj\.(?P<p>weight|bias)",
             hf_prefix + "encoder.layer.{i}.mlp.weights_in.{p}", ("gate", "up"))]


def dinov2_hf_config(args: Dinov2Args) -> dict:
    """A Dinov2Config dict, or a Dinov2WithRegistersConfig one, of the blocks built."""
    registers = args.pos_embed_antialias
    if args.num_register_tokens and not registers:
        raise ValueError("register tokens exist in HF only as Dinov2WithRegistersModel, which resizes positions "
                         "with antialias: set pos_embed_antialias=True")
    config = {"architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
              "model_type": "dinov2_with_registers" if registers else "dinov2", "hidden_size": args.dim,
              "num_hidden_layers": args.layers_built, "num_attention_heads": args.n_heads,
              # transformers' strict config takes an int where it can
              "mlp_ratio": int(args.mlp_ratio) if float(args.mlp_ratio).is_integer() else args.mlp_ratio, "use_swiglu_ffn": args.swiglu, "hidden_act": "gelu",
              "layer_norm_eps": args.norm_eps, "image_size": args.image_size, "patch_size": args.patch_size,
              "num_channels": args.in_channels, "qkv_bias": args.qkv_bias, "layerscale_value": args.layerscale_init,
              "drop_path_rate": 0.0}
    if registers:
        config["num_register_tokens"] = args.num_register_tokens
    return config


def dinov2_args_from_hf_config(c: dict, select_layer: int = -1) -> Dinov2Args:
    """Args for a Dinov2Config or Dinov2WithRegistersConfig dict. Stochastic depth
    (drop_path_rate) is a training regulariser that titan_mm does not implement."""
    kind = c.get("model_type")
    if kind not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"model_type {kind!r} is not dinov2 or dinov2_with_registers")
    if c.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"DINOv2 hidden_act {c['hidden_act']!r} is not implemented (gelu is)")
    for key in ("image_size", "patch_size"):
        if not isinstance(c.get(key, 0), int):
            raise ValueError(f"DINOv2 {key}={c[key]!r}: only square sizes (one int) are implemented")
    registers = kind == "dinov2_with_registers"
    return Dinov2Args(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      mlp_ratio=c.get("mlp_ratio", 4), swiglu=c.get("use_swiglu_ffn", False),
                      patch_size=c.get("patch_size", 14), image_size=c.get("image_size", 518),
                      num_register_tokens=c.get("num_register_tokens", 4) if registers else 0,
                      pos_embed_antialias=registers, qkv_bias=c.get("qkv_bias", True),
                      in_channels=c.get("num_channels", 3), norm_eps=c.get("layer_norm_eps", 1e-6),
                      layerscale_init=c.get("layerscale_value", 1.0), select_layer=select_layer)


class Dinov2Adapter(HFAdapter):
    """A bare Dinov2Encoder against a Dinov2Model / Dinov2WithRegistersModel checkpoint (families
    that embed the encoder use ``dinov2_key_map`` and ``dinov2_fused_key_map`` with their own
    prefixes)."""
    key_map = dinov2_key_map()
    fused_key_map = dinov2_fused_key_map()

    def __init__(self, select_layer: int = -1):
        self.select_layer = select_layer

    def hf_config(self, args: Dinov2Args) -> dict:
        return dinov2_hf_config(args)

    def args_from_hf_config(self, config: dict) -> Dinov2Args:
        return dinov2_args_from_hf_config(config, self.select_layer)

    def ignored_hf_key(self, key: str) -> bool:
        return key.endswith("embeddings.mask_token")

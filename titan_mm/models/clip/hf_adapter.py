"""HF CLIPVisionModel weights and config <-> titan_mm's CLIPVisionEncoder.

Names are those of published CLIP checkpoints (``vision_model.`` inside CLIPModel, and
transformers 4's CLIPVisionModel); transformers 5 saves a bare CLIPVisionModel without the prefix,
which loads too. HF's post_layernorm (the pooled class token's) and the blocks past
``select_layer`` are not built, so they are not read; an export holds the blocks built
(num_hidden_layers = layers_built: the exported model's last hidden state is our features).
"""

import re

from titan_mm.hf.adapter import HFAdapter
from titan_mm.models.clip.model import CLIPVisionArgs

_BLOCK_MODULES = ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def clip_key_map(hf_prefix: str = "vision_model.", ours_prefix: str = "") -> list[tuple[str, str]]:
    """(titan_mm regex, HF template) pairs; our block modules carry HF's names."""
    ours = re.escape(ours_prefix)
    key_map = [(ours + r"patch_embed\.weight", hf_prefix + "embeddings.patch_embedding.weight"),
               (ours + r"class_embedding", hf_prefix + "embeddings.class_embedding"),
               (ours + r"pos_embed", hf_prefix + "embeddings.position_embedding.weight"),
               (ours + r"pre_layrnorm\.(?P<p>weight|bias)", hf_prefix + "pre_layrnorm.{p}")]
    key_map += [(ours + rf"layers\.(?P<i>\d+)\.{re.escape(name)}\.(?P<p>weight|bias)",
                 hf_prefix + f"encoder.layers.{{i}}.{name}.{{p}}") for name in _BLOCK_MODULES]
    return key_map


def clip_hf_config(args: CLIPVisionArgs) -> dict:
    """A CLIPVisionConfig dict of the blocks built."""
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": args.dim,
            "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.layers_built,
            "num_attention_heads": args.n_heads, "num_channels": args.in_channels, "image_size": args.image_size,
            "patch_size": args.patch_size, "hidden_act": _HF_ACTIVATIONS[args.activation],
            "layer_norm_eps": args.norm_eps, "attention_dropout": 0.0}


def clip_args_from_hf_config(c: dict, select_layer: int = -2, interpolate_pos_encoding: bool = False) -> CLIPVisionArgs:
    """Args for a CLIPVisionConfig dict (or a CLIPConfig's vision_config)."""
    if c.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"vision model_type {c.get('model_type')!r} is not clip_vision_model")
    act = c.get("hidden_act", "quick_gelu")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"CLIP hidden_act {act!r} is not implemented (quick_gelu and gelu are)")
    for key in ("image_size", "patch_size"):
        if not isinstance(c.get(key, 0), int):
            raise ValueError(f"CLIP {key}={c[key]!r}: only square sizes (one int) are implemented")
    return CLIPVisionArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                          ffn_hidden_dim=c["intermediate_size"], patch_size=c.get("patch_size", 32),
                          image_size=c.get("image_size", 224), in_channels=c.get("num_channels", 3),
                          norm_eps=c.get("layer_norm_eps", 1e-5), activation=act, select_layer=select_layer,
                          interpolate_pos_encoding=interpolate_pos_encoding)


class CLIPVisionAdapter(HFAdapter):
    """A bare CLIPVisionEncoder against a CLIPVisionModel checkpoint (families that embed the
    encoder use ``clip_key_map`` with their own prefixes)."""
    key_map = clip_key_map()
    hf_prefix_aliases = [("vision_model.", "")]  # transformers 5 save_pretrained and state_dict()

    def __init__(self, select_layer: int = -2, interpolate_pos_encoding: bool = False):
        self.select_layer = select_layer
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def hf_config(self, args: CLIPVisionArgs) -> dict:
        return clip_hf_config(args)

    def args_from_hf_config(self, config: dict) -> CLIPVisionArgs:
        return clip_args_from_hf_config(config.get("vision_config", config), self.select_layer,
                                        self.interpolate_pos_encoding)

    def ignored_hf_key(self, key: str) -> bool:
        return "post_layernorm." in key

"""HF checkpoints of Qwen3VLForConditionalGeneration <-> titan_mm's Qwen3VLModel, by renames, except
the ViT's fused qkv, which is our q/k/v_proj concatenated."""

from titan_mm.hf.adapter import TOKEN_ID_FIELDS, HFAdapter
from titan_mm.hf.export import qwen_processor_files
from titan_mm.models.llama.hf_adapter import decoder_key_map, rope_scaling_from_hf, rope_scaling_to_hf
from titan_mm.models.llama.model import DecoderArgs
from titan_mm.models.qwen3_vl.model import Qwen3VLArgs, VisionArgs

_BLOCK_LEAVES = ("norm1", "norm2", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
_MERGER_LEAVES = ("norm", "linear_fc1", "linear_fc2")


def _vision_key_map() -> list[tuple[str, str]]:
    p = r"\.(?P<p>weight|bias)"
    key_map = [(r"vision\.patch_embed" + p, "model.visual.patch_embed.proj.{p}"),
               (r"vision\.pos_embed\.weight", "model.visual.pos_embed.weight")]
    key_map += [(r"vision\.layers\.(?P<i>\d+)\." + leaf.replace(".", r"\.") + p,
                 f"model.visual.blocks.{{i}}.{leaf}.{{p}}") for leaf in _BLOCK_LEAVES]
    key_map += [(rf"vision\.merger\.{leaf}" + p, f"model.visual.merger.{leaf}.{{p}}")
                for leaf in _MERGER_LEAVES]
    key_map += [(rf"vision\.deepstack_mergers\.(?P<j>\d+)\.{leaf}" + p,
                 f"model.visual.deepstack_merger_list.{{j}}.{leaf}.{{p}}") for leaf in _MERGER_LEAVES]
    return key_map


def _text_config(d: DecoderArgs) -> dict:
    return {
        "model_type": "qwen3_vl_text", "hidden_size": d.dim, "num_hidden_layers": d.n_layers,
        "num_attention_heads": d.n_heads, "num_key_value_heads": d.n_kv_heads, "head_dim": d.head_dim,
        "intermediate_size": d.ffn_hidden_dim, "vocab_size": d.vocab_size, "hidden_act": "silu",
        "rms_norm_eps": d.norm_eps, "max_position_embeddings": d.max_position_embeddings,
        "attention_bias": False, "tie_word_embeddings": d.tie_embeddings,
        # the hub's layout (rope_theta + rope_scaling), which transformers 4.57+ and 5.x both read
        "rope_theta": d.rope_theta,
        "rope_scaling": {"rope_type": "default", **(rope_scaling_to_hf(d.rope_scaling) or {}),
                         "mrope_section": list(d.mrope_section), "mrope_interleaved": True},
    }


def _vision_config(v: VisionArgs, out_dim: int) -> dict:
    return {
        "model_type": "qwen3_vl", "depth": v.n_layers, "hidden_size": v.dim, "num_heads": v.n_heads,
        "intermediate_size": v.ffn_hidden_dim, "hidden_act": "gelu_pytorch_tanh",
        "in_channels": v.in_channels, "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size, "out_hidden_size": out_dim,
        "num_position_embeddings": v.num_position_embeddings,
        "deepstack_visual_indexes": list(v.deepstack_layers), "initializer_range": v.init_std,
    }


def _decoder_args(c: dict) -> DecoderArgs:
    # transformers 5 writes rope_parameters; the hub's configs rope_theta + rope_scaling
    rope = c.get("rope_parameters") or {"rope_theta": c.get("rope_theta", 5_000_000.0),
                                        **(c.get("rope_scaling") or {})}
    unsupported = {"hidden_act": c.get("hidden_act", "silu") != "silu",
                   "attention_bias": c.get("attention_bias", False)}
    if any(unsupported.values()):
        raise ValueError(f"qwen3_vl text config sets {[k for k, v in unsupported.items() if v]}, which "
                         f"titan_mm's decoder does not implement")
    return DecoderArgs(
        dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        ffn_hidden_dim=c["intermediate_size"], vocab_size=c["vocab_size"], norm_eps=c["rms_norm_eps"],
        rope_theta=float(rope["rope_theta"]),
        rope_scaling=rope_scaling_from_hf(rope, c.get("max_position_embeddings", 128000)),
        max_position_embeddings=c.get("max_position_embeddings", 128000),
        qk_norm=True, tie_embeddings=c.get("tie_word_embeddings", False),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))), mrope_interleaved=True)


def _vision_args(c: dict) -> VisionArgs:
    if c.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"qwen3_vl vision hidden_act {c['hidden_act']!r} is not implemented "
                         f"(titan_mm's ViT uses gelu_pytorch_tanh)")
    return VisionArgs(
        dim=c["hidden_size"], n_layers=c["depth"], n_heads=c["num_heads"],
        ffn_hidden_dim=c["intermediate_size"], patch_size=c["patch_size"],
        temporal_patch_size=c["temporal_patch_size"], in_channels=c.get("in_channels", 3),
        spatial_merge_size=c["spatial_merge_size"], num_position_embeddings=c["num_position_embeddings"],
        deepstack_layers=tuple(c["deepstack_visual_indexes"]), init_std=c.get("initializer_range", 0.02))


class Qwen3VLAdapter(HFAdapter):
    key_map = _vision_key_map() + decoder_key_map("model.language_model.")
    fused_key_map = [(r"vision\.layers\.(?P<i>\d+)\.attn\.(?P<part>q|k|v)_proj\.(?P<p>weight|bias)",
                      "model.visual.blocks.{i}.attn.qkv.{p}", ("q", "k", "v"))]

    def hf_config(self, args: Qwen3VLArgs) -> dict:
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
            "image_token_id": args.image_token_id, "video_token_id": args.video_token_id,
            "vision_start_token_id": args.vision_start_token_id,
            "vision_end_token_id": args.vision_end_token_id,
            "tie_word_embeddings": args.decoder.tie_embeddings,
            "text_config": _text_config(args.decoder),
            "vision_config": _vision_config(args.vision, args.decoder.dim),
        }

    def hf_processor_files(self, args, min_pixels: int, max_pixels: int) -> dict[str, dict]:
        return qwen_processor_files(args.vision_input, "Qwen3VLProcessor", "Qwen3VLVideoProcessor", min_pixels, max_pixels)

    def args_from_hf_config(self, config: dict) -> Qwen3VLArgs:
        if config.get("model_type") != "qwen3_vl":
            raise ValueError(f"model_type {config.get('model_type')!r} is not qwen3_vl")
        text = dict(config["text_config"])
        # the top-level flag is the one Qwen3VLForConditionalGeneration reads
        text["tie_word_embeddings"] = config.get("tie_word_embeddings",
                                                 text.get("tie_word_embeddings", False))
        args = Qwen3VLArgs(vision=_vision_args(config["vision_config"]), decoder=_decoder_args(text))
        if config["vision_config"]["out_hidden_size"] != args.decoder.dim:
            raise ValueError("vision_config.out_hidden_size must equal text_config.hidden_size")
        for key in TOKEN_ID_FIELDS:
            if key in config:
                setattr(args, key, config[key])
        return args

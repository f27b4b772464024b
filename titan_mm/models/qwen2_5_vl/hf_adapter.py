"""Qwen2.5-VL <-> HF Qwen2_5_VLForConditionalGeneration checkpoints: key renames and config.json.

Every tensor keeps HF's shape (the patch embedding is stored like HF's Conv3d weight and flattened in
forward), so the mapping is renames, except the ViT's fused qkv, which is our q/k/v_proj
concatenated. Keys are those of
the released checkpoint files, which transformers' save_pretrained also writes (``visual.*``,
``model.layers.*``, ``lm_head``); transformers renames them to its module names when loading.
"""

from titan_mm.hf.adapter import TOKEN_ID_FIELDS, HFAdapter
from titan_mm.hf.export import qwen_processor_files
from titan_mm.models.llama.hf_adapter import rope_scaling_from_hf, rope_scaling_to_hf
from titan_mm.models.llama.model import DecoderArgs
from titan_mm.models.qwen2_5_vl.model import Qwen2_5_VLArgs, VisionArgs

_P = r"(?P<p>weight|bias)"
_VIT = r"vision\.layers\.(?P<i>\d+)"
_LM = r"decoder\.layers\.(?P<i>\d+)"
_HF_VIT = "visual.blocks.{i}"
_HF_LM = "model.layers.{i}"


class Qwen2_5_VLAdapter(HFAdapter):

    key_map = [
        (r"vision\.patch_embed\.weight", "visual.patch_embed.proj.weight"),
        (rf"{_VIT}\.(?P<n>norm1|norm2)\.weight", _HF_VIT + ".{n}.weight"),
        (rf"{_VIT}\.attn\.proj\.{_P}", _HF_VIT + ".attn.proj.{p}"),
        (rf"{_VIT}\.mlp\.(?P<n>gate_proj|up_proj|down_proj)\.{_P}", _HF_VIT + ".mlp.{n}.{p}"),
        (r"vision\.merger\.norm\.weight", "visual.merger.ln_q.weight"),
        (rf"vision\.merger\.linear_1\.{_P}", "visual.merger.mlp.0.{p}"),
        (rf"vision\.merger\.linear_2\.{_P}", "visual.merger.mlp.2.{p}"),
        (r"decoder\.tok_embeddings\.weight", "model.embed_tokens.weight"),
        (rf"{_LM}\.attention\.wq\.{_P}", _HF_LM + ".self_attn.q_proj.{p}"),
        (rf"{_LM}\.attention\.wk\.{_P}", _HF_LM + ".self_attn.k_proj.{p}"),
        (rf"{_LM}\.attention\.wv\.{_P}", _HF_LM + ".self_attn.v_proj.{p}"),
        (rf"{_LM}\.attention\.wo\.weight", _HF_LM + ".self_attn.o_proj.weight"),
        (rf"{_LM}\.feed_forward\.w1\.weight", _HF_LM + ".mlp.gate_proj.weight"),
        (rf"{_LM}\.feed_forward\.w3\.weight", _HF_LM + ".mlp.up_proj.weight"),
        (rf"{_LM}\.feed_forward\.w2\.weight", _HF_LM + ".mlp.down_proj.weight"),
        (rf"{_LM}\.attention_norm\.weight", _HF_LM + ".input_layernorm.weight"),
        (rf"{_LM}\.ffn_norm\.weight", _HF_LM + ".post_attention_layernorm.weight"),
        (r"decoder\.norm\.weight", "model.norm.weight"),
        (r"decoder\.output\.weight", "lm_head.weight"),
    ]
    fused_key_map = [(rf"{_VIT}\.attn\.(?P<part>q|k|v)_proj\.{_P}", _HF_VIT + ".attn.qkv.{p}", ("q", "k", "v"))]

    def hf_config(self, args: Qwen2_5_VLArgs) -> dict:
        d, v = args.decoder, args.vision
        text = {
            "model_type": "qwen2_5_vl_text", "hidden_size": d.dim, "intermediate_size": d.ffn_hidden_dim,
            "num_hidden_layers": d.n_layers, "num_attention_heads": d.n_heads,
            "num_key_value_heads": d.n_kv_heads, "vocab_size": d.vocab_size, "rms_norm_eps": d.norm_eps,
            "hidden_act": "silu", "max_position_embeddings": d.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", **(rope_scaling_to_hf(d.rope_scaling) or {}),
                                "rope_theta": d.rope_theta, "mrope_section": list(d.mrope_section)},
        }
        vision = {
            "model_type": "qwen2_5_vl_vision", "depth": v.n_layers, "hidden_size": v.dim,
            "intermediate_size": v.ffn_hidden_dim, "num_heads": v.n_heads, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "out_hidden_size": v.out_dim,
            "tokens_per_second": args.tokens_per_second, "hidden_act": "silu",
        }
        return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                "tie_word_embeddings": d.tie_embeddings, **{k: getattr(args, k) for k in TOKEN_ID_FIELDS},
                "text_config": text, "vision_config": vision}

    def hf_processor_files(self, args, min_pixels: int, max_pixels: int) -> dict[str, dict]:
        return qwen_processor_files(args.vision_input, "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", min_pixels, max_pixels)

    def args_from_hf_config(self, config: dict) -> Qwen2_5_VLArgs:
        # hub configs of the first Qwen2.5-VL releases keep the text fields at the top level
        text = config.get("text_config") or config
        vision = config["vision_config"]
        for name, cfg in (("text_config", text), ("vision_config", vision)):
            if cfg.get("hidden_act", "silu") != "silu":
                raise ValueError(f"{name}.hidden_act={cfg['hidden_act']!r} is not supported; "
                                 f"Qwen2.5-VL uses silu")
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        decoder = _decoder_args(text, tie)
        token_ids = {k: config[k] for k in TOKEN_ID_FIELDS if k in config}
        return Qwen2_5_VLArgs(vision=_vision_args(vision, decoder.dim), decoder=decoder,
                              tokens_per_second=vision.get("tokens_per_second", 4),  # HF's default
                              **token_ids)


def _decoder_args(text: dict, tie: bool) -> DecoderArgs:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    max_positions = text.get("max_position_embeddings", 128000)
    return DecoderArgs(
        dim=text["hidden_size"], n_layers=text["num_hidden_layers"], n_heads=text["num_attention_heads"],
        n_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        head_dim=text["hidden_size"] // text["num_attention_heads"], ffn_hidden_dim=text["intermediate_size"],
        vocab_size=text["vocab_size"], norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", text.get("rope_theta", 1e6)),
        max_position_embeddings=max_positions, qkv_bias=True, tie_embeddings=tie,
        rope_scaling=rope_scaling_from_hf(rope, max_positions),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))))


def _vision_args(vision: dict, decoder_dim: int) -> VisionArgs:
    return VisionArgs(
        dim=vision["hidden_size"], n_layers=vision["depth"], n_heads=vision["num_heads"],
        ffn_hidden_dim=vision["intermediate_size"], patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
        spatial_merge_size=vision.get("spatial_merge_size", 2), window_size=vision.get("window_size", 112),
        fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
        out_dim=vision.get("out_hidden_size", decoder_dim))

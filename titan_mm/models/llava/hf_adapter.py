"""HF LlavaForConditionalGeneration (SigLIP2 vision tower + Llama / Qwen2 / Qwen3 language model)
<-> titan_mm's LlavaModel.

HF LLaVA feeds the projector the vision tower's last encoder layer before post_layernorm
(vision_feature_layer=-1, strategy "full") and its projector is Linear-GELU-Linear on single
patches, so only flavors without a projector LayerNorm, without patch merge and without the ViT's
post_layernorm convert.
"""

import dataclasses

from titan_mm.hf.adapter import HFAdapter
from titan_mm.models.llama.hf_adapter import decoder_args_from_hf_config, decoder_hf_config, decoder_key_map
from titan_mm.models.llava.model import LlavaArgs
from titan_mm.models.siglip2.hf_adapter import vision_args_from_hf_config, vision_hf_config, vision_key_map

# what titan_mm's LLaVA implements of HF's LlavaConfig
_FIXED_CONFIG = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full",
                 "projector_hidden_act": "gelu", "multimodal_projector_bias": True}


class LlavaAdapter(HFAdapter):
    # the names of published LLaVA checkpoints, which transformers 4.x and 5.x both load
    key_map = (vision_key_map("vision_tower.vision_model.")
               + [(r"projector\.(?P<m>linear_1|linear_2)\.(?P<p>weight|bias)",
                   "multi_modal_projector.{m}.{p}")]
               + decoder_key_map("language_model.model.", lm_head="language_model.lm_head"))
    # transformers 5 in-memory names (a model's state_dict() and named_modules())
    hf_module_prefixes = [
        ("vision_tower.vision_model.", "model.vision_tower."),
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ]
    hf_prefix_aliases = [
        ("vision_tower.vision_model.", "vision_tower."),  # transformers 5 save_pretrained
        *hf_module_prefixes,
    ]

    def hf_config(self, args: LlavaArgs) -> dict:
        check_hf_compatible(args)
        text = decoder_hf_config(args.decoder)
        return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                "vision_config": vision_hf_config(args.vision), "text_config": text,
                "image_token_index": args.image_token_id, **_FIXED_CONFIG,
                "tie_word_embeddings": text["tie_word_embeddings"]}

    def hf_processor_files(self, args: LlavaArgs, min_pixels: int, max_pixels: int) -> dict[str, dict]:
        """SigLIP2's naflex image processor, its patch budget the run's max_pixels. (transformers'
        LlavaProcessor counts image tokens of fixed-size images, so it is not named: prompts expand
        each image placeholder to the image's patch count, as titan_mm's builders do.)"""
        v = args.vision
        return {"preprocessor_config.json": {
            "image_processor_type": "Siglip2ImageProcessor", "patch_size": v.patch_size,
            "max_num_patches": max_pixels // v.patch_size ** 2, "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.image_mean),
            "image_std": list(v.image_std)}}

    def args_from_hf_config(self, config: dict) -> LlavaArgs:
        wrong = {k: config.get(k, v) for k, v in _FIXED_CONFIG.items() if config.get(k, v) != v}
        if wrong:
            raise ValueError(f"LLaVA config has {wrong}; titan_mm's LLaVA implements {_FIXED_CONFIG}")
        # transformers 4.x ties by the text config; 5.x also reads the top-level key
        text = {"tie_word_embeddings": config.get("tie_word_embeddings", False), **config["text_config"]}
        decoder = decoder_args_from_hf_config(text)
        vision = vision_args_from_hf_config(config["vision_config"], apply_post_layernorm=False)
        return LlavaArgs(vision=vision, decoder=decoder, spatial_merge_size=1, projector_hidden_dim=decoder.dim,
                         projector_norm=False,
                         image_token_id=config.get("image_token_index", config.get("image_token_id", -1)))


def check_hf_compatible(args: LlavaArgs):
    """Raise, naming the fix, when ``args`` has no HF LlavaForConditionalGeneration counterpart."""
    hf_like = dict(spatial_merge_size=1, projector_norm=False, projector_hidden_dim=args.decoder.dim,
                   vision=dataclasses.replace(args.vision, apply_post_layernorm=False, channels_last=True))
    differs = [k for k, v in hf_like.items() if getattr(args, k) != v]
    if args.image_token_id < 0:
        differs.append("image_token_id")
    if differs:
        raise ValueError(
            f"this LLaVA flavor has no HF LlavaForConditionalGeneration layout (it differs in {differs}): "
            f"HF needs spatial_merge_size=1, projector_norm=False, projector_hidden_dim = decoder dim, a "
            f"SigLIP2 ViT with channels_last=True and apply_post_layernorm=False, and an image_token_id; "
            f"use a flavor such as debug-siglip2 or siglip2-so400m-qwen3-8b")

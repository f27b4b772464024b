"""LLaVA-style family: SigLIP2-style ViT + projector + Llama/Qwen decoder."""

import dataclasses

from titan_mm.models import ModelSpec, ParamPolicy
from titan_mm.models.llama import FLAVORS as TEXT_FLAVORS
from titan_mm.models.llama.model import DecoderArgs
from titan_mm.models.llama.parallelize import vlm_tensor_parallel_sizes
from titan_mm.models.llava.hf_adapter import LlavaAdapter
from titan_mm.models.llava.model import LlavaArgs, LlavaModel, training_flops
from titan_mm.models.llava.parallelize import parallelize_llava
from titan_mm.models.siglip2.model import VisionArgs

# SigLIP2 so400m-patch16-naflex, as HF LLaVA reads it: last encoder layer, before post_layernorm
SO400M_PATCH16 = VisionArgs(dim=1152, n_layers=27, n_heads=16, ffn_hidden_dim=4304, patch_size=16,
                            pos_embed_side=16, channels_last=True, apply_post_layernorm=False)
QWEN_IMAGE_PAD_ID = 151655
"""<|image_pad|> of the Qwen2.5 / Qwen3 tokenizers, the placeholder the LLaVA presets record."""


def _siglip2_qwen3(text_flavor: str) -> LlavaArgs:
    decoder = TEXT_FLAVORS[text_flavor].decoder
    return LlavaArgs(vision=SO400M_PATCH16, decoder=decoder, spatial_merge_size=1,
                     projector_hidden_dim=decoder.dim, projector_norm=False, image_token_id=QWEN_IMAGE_PAD_ID)


FLAVORS = {
    # ~4M parameters: learns the bundled synthetic captions on a laptop CPU in minutes
    "debug": LlavaArgs(
        vision=VisionArgs(dim=128, n_layers=3, n_heads=4, ffn_hidden_dim=384, patch_size=8,
                          pos_embed_side=16),
        decoder=DecoderArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                            ffn_hidden_dim=768, vocab_size=512, qk_norm=True, tie_embeddings=True),
        spatial_merge_size=2,
        projector_hidden_dim=512,
    ),
    # the same sizes in HF LlavaForConditionalGeneration's layout (SigLIP2 + Qwen3), so it converts;
    # one image token per 8 x 8 patch (no merge); image_token_id is the bundled tokenizer's
    "debug-siglip2": LlavaArgs(
        vision=VisionArgs(dim=128, n_layers=3, n_heads=4, ffn_hidden_dim=384, patch_size=8,
                          pos_embed_side=8, channels_last=True, apply_post_layernorm=False),
        decoder=TEXT_FLAVORS["debug"].decoder,
        spatial_merge_size=1, projector_hidden_dim=256, projector_norm=False, image_token_id=4,
    ),
    "siglip2-so400m-qwen3-1.7b": _siglip2_qwen3("qwen3-1.7b"),
    "siglip2-so400m-qwen3-4b": _siglip2_qwen3("qwen3-4b"),
    "siglip2-so400m-qwen3-8b": _siglip2_qwen3("qwen3-8b"),
}
# the debug model with its own output head, which pipeline parallelism needs (the head is on the
# last stage, the token embeddings on the first)
FLAVORS["debug-untied"] = dataclasses.replace(
    FLAVORS["debug"], decoder=dataclasses.replace(FLAVORS["debug"].decoder, tie_embeddings=False))

SPEC = ModelSpec(name="llava", flavors=FLAVORS, model_cls=LlavaModel, parallelize=parallelize_llava,
                 training_flops=training_flops, hf_adapter=LlavaAdapter(),
                 tensor_parallel_sizes=vlm_tensor_parallel_sizes,
                 param_policy=ParamPolicy(module_groups={"vision": ("vision",), "projector": ("projector",),
                                                         "decoder": ("decoder",)}))

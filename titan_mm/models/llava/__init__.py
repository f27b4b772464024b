"""LLaVA-style family: SigLIP2-style ViT + projector + Llama/Qwen decoder."""

from titan_mm.models import ModelSpec
from titan_mm.models.llama.model import DecoderArgs
from titan_mm.models.llava.model import LlavaArgs, LlavaModel, training_flops
from titan_mm.models.llava.parallelize import parallelize_llava
from titan_mm.models.siglip2.model import VisionArgs

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
}

SPEC = ModelSpec(name="llava", flavors=FLAVORS, model_cls=LlavaModel, parallelize=parallelize_llava,
                 training_flops=training_flops)

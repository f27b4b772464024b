"""CLIP's vision tower, an encoder of the Cambrian family (not a model family of its own).

FLAVORS: ``debug`` (tiny, CPU tests) and the sizes Cambrian uses. Each reads the penultimate
hidden state (select_layer=-2), as LLaVA and Cambrian do.
"""

from titan_mm.models.clip.model import CLIPVisionArgs

FLAVORS = {
    "debug": CLIPVisionArgs(dim=64, n_layers=3, n_heads=4, ffn_hidden_dim=256, patch_size=8, image_size=64),
    # openai/clip-vit-large-patch14-336
    "vit-l-14-336": CLIPVisionArgs(dim=1024, n_layers=24, n_heads=16, ffn_hidden_dim=4096, patch_size=14,
                                   image_size=336),
}

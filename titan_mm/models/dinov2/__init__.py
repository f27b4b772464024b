"""DINOv2's ViT, an encoder of the Cambrian family (not a model family of its own).

FLAVORS: ``debug`` (tiny, CPU tests) and the published sizes; every one resizes its position
table to any image size (Cambrian feeds DINOv2 378 x 378 images: a 27 x 27 grid).
"""

from titan_mm.models.dinov2.model import Dinov2Args

FLAVORS = {
    "debug": Dinov2Args(dim=64, n_layers=2, n_heads=4, mlp_ratio=4, patch_size=8, image_size=64),
    # facebook/dinov2-large
    "vit-l-14": Dinov2Args(dim=1024, n_layers=24, n_heads=16),
    # facebook/dinov2-with-registers-large
    "vit-l-14-reg4": Dinov2Args(dim=1024, n_layers=24, n_heads=16, num_register_tokens=4, pos_embed_antialias=True),
    # facebook/dinov2-giant (Cambrian-1's DINOv2)
    "vit-g-14": Dinov2Args(dim=1536, n_layers=40, n_heads=24, swiglu=True),
}

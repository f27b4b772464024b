"""SigLIP2 naflex vision tower: our patches equal Siglip2ImageProcessor's, and our ViT equals
transformers' Siglip2VisionModel (tiny random config, fp32, eval) on padded native-resolution batches."""

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from titan_mm.data.image import ImageProcessor, VisionInputSpec, patchify
from titan_mm.hf.adapter import HFAdapter
from titan_mm.hf.io import load_hf_state_dict
from titan_mm.models.siglip2.hf_adapter import vision_args_from_hf_config, vision_hf_config, vision_key_map
from titan_mm.models.siglip2.model import VisionTransformer

transformers = pytest.importorskip("transformers")
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil  # noqa: E402

TOL = 1e-4


@pytest.mark.parametrize("height,width", [(64, 48), (48, 160), (16, 512), (512, 16), (96, 96), (16, 16)])
def test_patches_equal_siglip2_image_processor(height, width):
    """channels_last patches in row-major order (merge 1) equal the processor's pixel_values, up to
    float rounding of the normalisation (max abs diff <= 1e-6). Our resize rule (smart_resize within
    min/max pixels) is not SigLIP2's (fill max_num_patches), so images come at patch-multiple sizes
    that neither side resizes (do_resize=False there); 1 x 32 and 32 x 1 grids are the extreme ratios."""
    spec = VisionInputSpec(patch_size=16, temporal_patch_size=1, spatial_merge_size=1,
                           image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), channels_last=True)
    rng = np.random.default_rng(height * 1000 + width)
    img = PILImage.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ours, coords = ImageProcessor(spec, min_pixels=16 * 16, max_pixels=512 * 512)(img)
    n = (height // 16) * (width // 16)
    ref = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=n, do_resize=False)(
        images=[img], return_tensors="pt")
    assert ours.shape == ref["pixel_values"][0].shape
    assert ref["spatial_shapes"][0].tolist() == (coords[:, 1:].amax(0) + 1).tolist()
    assert (ours - ref["pixel_values"][0]).abs().max() <= 1e-6
    # row-major patch order: patch k sits at (k // w, k % w)
    w = width // 16
    assert coords[:, 1].tolist() == [k // w for k in range(n)] and coords[:, 2].tolist() == [k % w for k in range(n)]


def hf_vision_model():
    config = transformers.Siglip2VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
        patch_size=4, num_patches=64, vision_use_head=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Siglip2VisionModel(config).eval()
    with torch.no_grad():  # random norms and biases, so a wrong mapping cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model


class VisionOnlyAdapter(HFAdapter):
    """A bare VisionTransformer against a bare Siglip2VisionModel (LLaVA uses the same map, prefixed)."""
    key_map = vision_key_map(hf_prefix="", ours_prefix="")


# (h, w) patch grids against an 8 x 8 position table: shrunk (antialiased), enlarged, extreme ratios
GRIDS = [(3, 5), (8, 8), (1, 24), (12, 10), (24, 1), (2, 2)]


def padded_batch(grids, patch: int, L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(grids), L, 3 * patch * patch)
    coords = torch.full((len(grids), L, 3), -1)
    for i, (h, w) in enumerate(grids):
        frames = torch.randn(1, 3, h * patch, w * patch, generator=g)
        p, c = patchify(frames, patch, 1, 1, channels_last=True)
        pixels[i, :len(p)], coords[i, :len(c)] = p, c
    return pixels, coords


@pytest.mark.parametrize("post_layernorm", [True, False])
def test_vit_matches_siglip2_vision_model(post_layernorm):
    """Padded batch of six images (L = 128 slots): valid-patch outputs equal last_hidden_state (with
    post_layernorm) or hidden_states[-1] (without, what LLaVA reads): max abs diff <= 1e-4
    (measured 0: the same ops in the same order; without antialias it would be 0.27)."""
    hf = hf_vision_model()
    args = vision_args_from_hf_config(hf.config.to_dict(), apply_post_layernorm=post_layernorm)
    with torch.device("meta"):
        ours = VisionTransformer(args)
    ours.to_empty(device="cpu")
    ours.init_weights()
    load_hf_state_dict(ours, VisionOnlyAdapter(), hf.state_dict())
    ours.eval()
    pixels, coords = padded_batch(GRIDS, patch=4, L=128)
    valid = coords[..., 0] >= 0
    with torch.no_grad():
        out = ours(pixels, coords)
        ref = hf(pixel_values=pixels, pixel_attention_mask=valid.long(),
                 spatial_shapes=torch.tensor(GRIDS), output_hidden_states=True)
    ref = ref.last_hidden_state if post_layernorm else ref.hidden_states[-1]
    diff = (out[valid] - ref[valid]).abs().max().item()
    print(f"post_layernorm={post_layernorm}: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_vision_hf_config_round_trips():
    hf = hf_vision_model()
    args = vision_args_from_hf_config(hf.config.to_dict(), apply_post_layernorm=True)
    config = transformers.Siglip2VisionConfig(**vision_hf_config(args))
    assert vision_args_from_hf_config(config.to_dict(), apply_post_layernorm=True) == args

"""Several images share a patch slot: every vision encoder treats each image (and each frame of a
video) as if it had the slot to itself.

For every VL family (debug flavors, fp32, CPU) one row is laid out twice with build_row: once with
each image and video in a slot of its own, once with all of them one after another in one slot.
The image embeddings each image token receives (Qwen3-VL: DeepStack features too) and the logits
must agree within 1e-5. Weights are O(1) random, so a patch that attended to, or resampled its
position table for, a neighbouring image would move them far beyond that.
"""

import dataclasses

import pytest
import torch

from titan_mm.data.dataloader import collate_rows, run_lengths
from titan_mm.data.documents import Document, Image
from titan_mm.data.image import patchify
from titan_mm.data.packing import RowShape, build_row, media_item_sizes, one_medium_per_slot
from titan_mm.models import get_model_spec
from titan_mm.models.multimodal import visual_item_hw, visual_item_ids

BOS, EOS, START, IMAGE_ID, END, VIDEO_ID = 1, 2, 3, 4, 5, 6
TOL = 1e-5
S, L = 192, 144  # the 132 patches of GRIDS and VIDEO_GRID fit one slot
# (h, w) patch grids of aspect ratios 1:4, 2:1 and 1:1; Qwen2.5-VL's debug windows are 4 x 4
# patches, so the 6-patch side ends in a window cut short
GRIDS = [(2, 8), (8, 4), (6, 6)]
VIDEO_GRID = (2, 4, 6)  # 2 temporal patches of 4 x 6
FAMILIES = [("llava", "debug"), ("llava", "debug-siglip2"), ("qwen2_5_vl", "debug"), ("qwen3_vl", "debug")]


def build_model(family: str, flavor: str, backend: str):
    spec = get_model_spec(family)
    args = spec.flavors[flavor]
    args = dataclasses.replace(args, vision=dataclasses.replace(args.vision, attention_backend=backend))
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(0)
    with torch.no_grad():  # O(1) activations (0.02 init would shrink every difference)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0.0, (p.numel() / p.shape[0]) ** -0.5)
    return model.eval(), args


def random_media(spec, grid, seed: int, is_video: bool = False) -> Image:
    t, h, w = grid
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(t * spec.temporal_patch_size, 3, h * spec.patch_size, w * spec.patch_size, generator=g)
    patches, coords = patchify(frames, spec.patch_size, spec.temporal_patch_size, spec.spatial_merge_size,
                               spec.channels_last)
    return Image(patches, coords, is_video=is_video, seconds_per_temporal_patch=1.0 if is_video else 0.0)


def document(spec, media: list[Image]) -> Document:
    """Text, then each image or video as its placeholder blocks (Qwen3-VL's layout for videos: one
    block per temporal patch after two stand-in timestamp tokens), then text."""
    g = torch.Generator().manual_seed(len(media))
    text = lambda n: torch.randint(10, 500, (n,), generator=g).tolist()  # noqa: E731
    tokens = [BOS] + text(3)
    for m in media:
        pad = VIDEO_ID if m.is_video else IMAGE_ID
        t, h, w = m.grid
        block = (h * w) // spec.merge_area
        if m.is_video and spec.video_layout is not None:
            for frame in range(t):
                tokens += text(2) + [START]
                if frame == 0:
                    m.first_token = len(tokens)
                tokens += [pad] * block + [END]
        else:
            tokens += [START]
            m.first_token = len(tokens)
            tokens += [pad] * (t * block) + [END]
        tokens += text(4)
    tokens.append(EOS)
    doc = Document("slots", tokens, [True] * len(tokens), media)
    if spec.positions_fn is not None:
        doc.positions = spec.positions_fn(doc)
    return doc


def one_slot(doc: Document) -> list:
    """Every visual item of ``doc`` in slot 0, one after another."""
    placement, offset = [], 0
    for media in doc.images:
        for size in media_item_sizes(media):
            placement.append((0, offset))
            offset += size
    return [placement]


def batch_of(doc: Document, spec, n_slots: int, placements) -> dict:
    shape = RowShape(S, n_slots, L, spec.patch_dim, spec.merge_area, 0, (IMAGE_ID, VIDEO_ID),
                     spec.position_dims)
    return collate_rows([build_row([doc], shape, placements)], L // spec.merge_area)


def encode(model, family: str, batch: dict) -> list[torch.Tensor]:
    """The merged image embeddings (and DeepStack features) of the batch's slots."""
    if family == "llava":
        return [model.encode_images(batch["pixel_values"], batch["grid_thw"])]
    out = model.vision(batch["pixel_values"], batch["grid_thw"])
    return [out[0], *out[1]] if family == "qwen3_vl" else [out]


def max_diff_at_tokens(a: list[torch.Tensor], index_a: torch.Tensor, b: list[torch.Tensor],
                       index_b: torch.Tensor) -> float:
    """Largest difference between what the image tokens of two layouts of one row read."""
    used_a, used_b = index_a[index_a >= 0], index_b[index_b >= 0]
    return max((x[used_a] - y[used_b]).abs().max().item() for x, y in zip(a, b))


def media_of(family: str, spec) -> list[Image]:
    media = [random_media(spec, (1, *grid), seed) for seed, grid in enumerate(GRIDS)]
    if family != "llava":
        media.insert(1, random_media(spec, VIDEO_GRID, 9, is_video=True))
    return media


@pytest.mark.parametrize("family,flavor,backend", [(*f, "sdpa") for f in FAMILIES] + [
    ("qwen2_5_vl", "debug", "flex"), ("qwen3_vl", "debug", "flex")])
def test_images_sharing_a_slot_get_the_embeddings_they_get_alone(family, flavor, backend):
    """Three images (1:4, 2:1, 1:1) and, for the Qwen families, a two-frame video: the merged
    embeddings (and Qwen3-VL's DeepStack features) at every image token and the logits are the
    same, within 1e-5, whether they share one slot or each has its own."""
    model, args = build_model(family, flavor, backend)
    spec = args.vision_input
    doc = document(spec, media_of(family, spec))
    alone = batch_of(doc, spec, len(doc.images), one_medium_per_slot([doc], len(doc.images)))
    shared = batch_of(doc, spec, 2, one_slot(doc))
    assert (visual_item_ids(shared["grid_thw"])[0].amax() + 1) == sum(len(media_item_sizes(m)) for m in doc.images)
    inputs = ("input_ids", "position_ids", "document_ids", "pixel_values", "grid_thw", "image_token_index")
    with torch.no_grad():
        embeds = max_diff_at_tokens(encode(model, family, alone), alone["image_token_index"],
                                    encode(model, family, shared), shared["image_token_index"])
        logits = (model.decoder.logits(model(**{k: alone[k] for k in inputs}))
                  - model.decoder.logits(model(**{k: shared[k] for k in inputs}))).abs().max().item()
    print(f"{family}/{flavor} {backend}: max abs diff embeddings {embeds:.1e}, logits {logits:.1e}")
    assert embeds <= TOL and logits <= TOL


def test_item_ids_and_sizes_follow_from_the_coordinates():
    """Two images and a two-frame video in one slot, padding after them: each patch's item id
    (0, 1, then one per frame) and its item's (h, w); the varlen backend's segment lengths are the
    items' patch counts, then the padding."""
    spec = get_model_spec("qwen2_5_vl").flavors["debug"].vision_input
    doc = document(spec, [random_media(spec, (1, 2, 8), 0), random_media(spec, (1, 8, 4), 1),
                          random_media(spec, (2, 4, 6), 2, is_video=True)])
    batch = batch_of(doc, spec, 2, one_slot(doc))
    ids = visual_item_ids(batch["grid_thw"])
    expect = torch.cat([torch.full((n,), i) for i, n in enumerate([16, 32, 24, 24])] + [torch.full((L - 96,), -1)])
    assert torch.equal(ids[0], expect) and (ids[1] == -1).all()
    hw = visual_item_hw(batch["grid_thw"])[0]
    assert hw[:16].unique(dim=0).tolist() == [[2, 8]] and hw[16:48].unique(dim=0).tolist() == [[8, 4]]
    assert hw[48:96].unique(dim=0).tolist() == [[4, 6]] and (hw[96:] == 0).all()
    assert batch["frame_lengths"].tolist() == [[16, 32, 24, 24, L - 96], [L, 0, 0, 0, 0]]
    assert torch.equal(batch["frame_lengths"], run_lengths(ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen kernels are CUDA only")
@pytest.mark.parametrize("family,flavor", FAMILIES)
def test_varlen_vit_on_shared_slots_matches_sdpa(family, flavor):
    """The varlen backend, given the collated item lengths (frame_lengths), computes what sdpa does
    on images sharing a slot: bf16 on the GPU, within 5% of the largest embedding."""
    spec_args = get_model_spec(family).flavors[flavor]
    spec = spec_args.vision_input
    doc = document(spec, media_of(family, spec))
    shared = batch_of(doc, spec, 2, one_slot(doc))
    outs = []
    for backend in ("sdpa", "varlen"):
        model, _ = build_model(family, flavor, backend)
        model = model.cuda().to(torch.bfloat16)
        batch = {k: v.cuda() for k, v in shared.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            if family == "llava":
                out = model.encode_images(batch["pixel_values"], batch["grid_thw"], batch["frame_lengths"])
            else:
                out = model.vision(batch["pixel_values"], batch["grid_thw"], batch["frame_lengths"])
                out = out[0] if family == "qwen3_vl" else out
        outs.append(out[shared["image_token_index"][shared["image_token_index"] >= 0].cuda()].float())
    assert (outs[0] - outs[1]).abs().max().item() <= 5e-2 * outs[0].abs().max().item()

"""Model: image embeddings land at their own tokens, packed documents are isolated, no host syncs."""

import pytest
import torch

from conftest import forward_on_meta

from titan_mm.data.documents import Document, Image
from titan_mm.data.image import patchify
from titan_mm.data.packing import RowShape
from titan_mm.data.dataloader import collate_rows
from titan_mm.data.packing import build_row
from titan_mm.models.llava import FLAVORS, LlavaModel
from titan_mm.models.multimodal import image_token_positions, scatter_image_embeddings
from titan_mm.models.siglip2.model import bilinear_weights

ARGS = FLAVORS["debug"]
SPEC = ARGS.vision_input
IMAGE_ID, PAD_ID = 4, 0


def build_model(seed=0) -> LlavaModel:
    with torch.device("meta"):
        model = LlavaModel(ARGS)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def random_image(gh: int, gw: int, seed: int) -> Image:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(1, 3, gh * SPEC.patch_size, gw * SPEC.patch_size, generator=g)
    return Image(*patchify(frames, SPEC.patch_size, 1, SPEC.spatial_merge_size))


def doc_with(images: list[Image], text: list[int], seed: int) -> Document:
    g = torch.Generator().manual_seed(seed)
    tokens, targets = [2], [False]
    for img in images:
        n = img.patches.shape[0] // SPEC.merge_area
        tokens += [3] + [IMAGE_ID] * n + [5]
        targets += [False] * (n + 2)
        tokens += torch.randint(6, 500, (len(text),), generator=g).tolist()
        targets += [True] * len(text)
    return Document("t", tokens + [1], targets + [True], images)


SHAPE = RowShape(seq_len=160, image_slots=4, patches_per_slot=64, patch_dim=SPEC.patch_dim,
                 merge_area=SPEC.merge_area, pad_id=PAD_ID, media_token_ids=(IMAGE_ID,))


def test_each_image_embedding_lands_exactly_at_its_own_tokens():
    # row 0: two images of different sizes in one document + a text-only document; row 1: three
    # images across two documents; unused slots stay all-padding
    row0 = build_row([doc_with([random_image(2, 4, 0), random_image(4, 2, 1)], [7] * 3, 0),
                      doc_with([], [7] * 5, 1)], SHAPE)
    row1 = build_row([doc_with([random_image(2, 2, 2)], [7] * 2, 2),
                      doc_with([random_image(6, 4, 3), random_image(2, 6, 4)], [7], 3)], SHAPE)
    batch = collate_rows([row0, row1], SHAPE.patches_per_slot // SHAPE.merge_area)
    assert (batch["grid_thw"][3, :, 0] == -1).all()  # row 0's last slot is all padding
    Lm = SHAPE.patches_per_slot // SHAPE.merge_area
    # distinct embedding per (image slot, merged patch): slot * 1000 + patch index
    embeds = (torch.arange(8)[:, None] * 1000 + torch.arange(Lm)[None]).float().view(-1, 1).expand(-1, 8)
    h = torch.full((2, 160, 8), -7.0)
    h.requires_grad_(True)
    embeds.requires_grad_(True)
    out = scatter_image_embeddings(h, embeds, image_token_positions(batch["image_token_index"], len(embeds)))
    # backward: each used embedding gets its own token's gradient, padding slots none, and the
    # replaced token embeddings none
    grad = torch.randn_like(out)
    out.backward(grad)
    is_img_BS = batch["image_token_index"] >= 0
    assert (h.grad[is_img_BS] == 0).all() and torch.equal(h.grad[~is_img_BS], grad[~is_img_BS])
    used = batch["image_token_index"][is_img_BS]
    assert torch.equal(embeds.grad[used], grad[is_img_BS])
    unused = torch.ones(len(embeds), dtype=torch.bool)
    unused[used] = False
    assert (embeds.grad[unused] == 0).all()
    out = out.detach()
    for b in range(2):
        is_img = batch["input_ids"][b] == IMAGE_ID
        assert (out[b, ~is_img] == -7).all()
        got = out[b, is_img, 0].long().tolist()
        expect = []
        for slot in range(b * 4, b * 4 + 4):
            n_valid = int((batch["grid_thw"][slot, :, 0] >= 0).sum()) // SHAPE.merge_area
            expect += [slot * 1000 + i for i in range(n_valid)]
        assert got == expect


def test_changing_one_document_leaves_the_others_logits_unchanged():
    model = build_model()
    docs = [doc_with([random_image(2, 4, 0)], [7] * 6, 0), doc_with([random_image(4, 4, 1)], [7] * 5, 1),
            doc_with([], [7] * 9, 2)]
    changed = [docs[0], doc_with([random_image(2, 2, 9)], [7] * 8, 9), docs[2]]
    with torch.no_grad():
        logits_a, batch_a = run(model, docs)
        logits_b, batch_b = run(model, changed)
    for doc_id in (0, 2):
        a = logits_a[0, batch_a["document_ids"][0] == doc_id]
        b = logits_b[0, batch_b["document_ids"][0] == doc_id]
        assert a.shape == b.shape
        # the third document moved within the row; its positions restart so logits must match
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def run(model, docs):
    batch = collate_rows([build_row(docs, SHAPE)], SHAPE.patches_per_slot // SHAPE.merge_area)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "document_ids", "pixel_values",
                                    "grid_thw", "image_token_index")}
    return model.decoder.logits(model(**inputs)), batch


MODEL_INPUTS = ("input_ids", "position_ids", "document_ids", "pixel_values", "grid_thw", "image_token_index")


def one_image_batch() -> dict:
    batch = collate_rows([build_row([doc_with([random_image(2, 4, 0)], [7] * 6, 0)], SHAPE)],
                         SHAPE.patches_per_slot // SHAPE.merge_area)
    return {k: batch[k] for k in MODEL_INPUTS}


def test_forward_has_no_host_syncs():
    """A forward on the meta device, where no tensor holds data: any .item(), .tolist(), .cpu() or
    data-dependent branch raises (conftest.forward_on_meta)."""
    logits = forward_on_meta(LlavaModel, ARGS, one_image_batch())
    assert logits.shape == (1, SHAPE.seq_len, ARGS.decoder.vocab_size)


@pytest.mark.parametrize("sync", [
    lambda h: h + h.sum().item(),
    lambda h: h + torch.tensor(h[0, 0, :2].tolist(), device=h.device).sum(),
    lambda h: h.cpu().to(h.device),
    lambda h: h * 2 if (h > 0).any() else h,
], ids=["item", "tolist", "cpu", "branch"])
def test_host_sync_detector_catches_a_sync_added_to_forward(monkeypatch, sync):
    """The detector itself: the same forward with a sync added after the decoder's last norm fails."""
    from titan_mm.models.llama.model import RMSNorm
    norm_forward = RMSNorm.forward
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: sync(norm_forward(self, x)))
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        forward_on_meta(LlavaModel, ARGS, one_image_batch())


@pytest.mark.parametrize("out_h,out_w,antialias", [(7, 23, True), (7, 23, False), (3, 16, True),
                                                    (32, 5, True), (16, 16, False)])
def test_position_table_resize_matches_interpolate(out_h, out_w, antialias):
    import torch.nn.functional as F
    P = 16
    table = torch.randn(1, 1, P, P, dtype=torch.float64)
    ref = F.interpolate(table, size=(out_h, out_w), mode="bilinear", align_corners=False,
                        antialias=antialias)[0, 0]
    w_h = bilinear_weights(torch.arange(out_h)[None], torch.tensor([out_h]), P, antialias)[0]
    w_w = bilinear_weights(torch.arange(out_w)[None], torch.tensor([out_w]), P, antialias)[0]
    ours = w_h.double() @ table[0, 0] @ w_w.double().T
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()  # fp32 weights


@pytest.mark.parametrize("family,flavor", [("llava", "debug"), ("llava", "debug-siglip2"), ("llama", "debug"),
                                           ("llama", "debug-qwen2"), ("llama", "debug-llama3"), ("qwen2_5_vl", "debug"), ("qwen3_vl", "debug")])
def test_init_weights_sets_every_parameter(family, flavor):
    """Materialised memory is garbage: init_weights must overwrite all of it (NaN-filled here)."""
    from titan_mm.models import get_model_spec
    spec = get_model_spec(family)
    with torch.device("meta"):
        model = spec.model_cls(spec.flavors[flavor])
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, bad

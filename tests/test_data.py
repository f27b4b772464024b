"""Data pipeline: image processing, documents, best-fit packing, bad samples, loader state."""

import json
import math
import shutil
import signal

import pytest
import torch
from PIL import Image

from titan_mm.config import Data
from titan_mm.data.dataloader import build_dataloader, build_document_builder
from titan_mm.data.image import ImageProcessor, patchify, smart_resize
from titan_mm.data.packing import IGNORE_INDEX, BestFitPacker, RowShape
from titan_mm.data.sources import StreamingSource
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.models.llava import FLAVORS

SPEC = FLAVORS["debug"].vision_input
DATA = "assets/sample_data"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer("assets/tokenizer")


def data_cfg(**kw) -> Data:
    base = dict(image_slots_per_row=20, patches_per_slot=64, min_pixels=1024, max_pixels=4096)
    base.update(kw)
    return Data(**base)


def loader(tokenizer, path=f"{DATA}/captions_train.jsonl", seq_len=512, **kw):
    return build_dataloader(data_cfg(path=path, **kw), tokenizer, SPEC, seq_len=seq_len, batch_size=1,
                            dp_rank=0, dp_world=1, seed=0)


@pytest.mark.parametrize("h,w", [(32, 32), (37, 500), (500, 37), (1000, 1000), (17, 23), (128, 64)])
def test_smart_resize_keeps_bounds_and_factor(h, w):
    rh, rw = smart_resize(h, w, 16, 1024, 4096)
    assert rh % 16 == 0 and rw % 16 == 0
    assert rh * rw <= 4096 and rh * rw >= 1024 or min(rh, rw) == 16
    assert abs(math.log((rh / rw) / (h / w))) < 1.0


def test_patchify_orders_patches_in_merge_blocks():
    frames = torch.arange(1 * 1 * 4 * 8, dtype=torch.float32).view(1, 1, 4, 8)  # T C H W, patch 2, merge 2
    patches, coords = patchify(frames, patch=2, temporal_patch=1, merge=2)
    assert patches.shape == (8, 4) and coords.shape == (8, 3)
    # first merge block: patches (0,0), (0,1), (1,0), (1,1) of the 2 x 4 patch grid
    assert coords[:4, 1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert coords[4:, 1:].tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    # every patch holds the pixels at its coordinate
    for p, (_, h, w) in zip(patches, coords.tolist()):
        assert torch.equal(p.view(2, 2), frames[0, 0, 2 * h:2 * h + 2, 2 * w:2 * w + 2])


def test_image_processor_normalises_and_counts_tokens():
    img = Image.new("RGB", (96, 48), (255, 0, 0))
    patches, coords = ImageProcessor(SPEC, 1024, 4096)(img)
    assert patches.shape[1] == SPEC.patch_dim
    assert patches.shape[0] == (coords[:, 1].max() + 1) * (coords[:, 2].max() + 1)
    red = patches.view(-1, 3, 64)[:, 0]
    assert torch.allclose(red, torch.ones_like(red))  # (1 - 0.5) / 0.5


def test_caption_document_supervises_only_caption_and_eos(tokenizer):
    builder = build_document_builder(data_cfg(), tokenizer, SPEC)
    doc = builder.caption("x", f"{DATA}/images/00000.png", "a red circle.")
    caption = tokenizer.encode("a red circle.")
    assert doc.tokens[-len(caption) - 1:] == caption + [tokenizer.eos_id]
    assert [t for t, m in zip(doc.tokens, doc.targets) if m] == caption + [tokenizer.eos_id]
    n_image = doc.tokens.count(tokenizer.image_id)
    assert n_image == doc.images[0].patches.shape[0] // 4


def test_packing_wastes_under_5_percent_of_token_slots(tokenizer):
    it = iter(loader(tokenizer))
    rows = [next(it) for _ in range(100)]
    pad = sum(r["stats"].get("pad_tokens", 0) for r in rows)
    waste = pad / (100 * 512)
    print(f"packing waste on bundled captions: {100 * waste:.2f}%")
    assert waste < 0.05


def test_packed_rows_respect_budgets_and_restart_positions(tokenizer):
    batch = next(iter(loader(tokenizer, path=f"{DATA}/interleaved.jsonl", dataset="interleaved",
                             image_slots_per_row=6)))
    ids, pos, doc = batch["input_ids"][0], batch["position_ids"][0], batch["document_ids"][0]
    starts = (pos == 0) & (doc >= 0)
    assert starts.sum() == doc.max() + 1  # one position restart per document
    assert (ids[starts] == tokenizer.bos_id).all()
    # every image is one visual item, laid out from its (0, 0, 0) patch, several to a slot
    grid = batch["grid_thw"]
    n_images = ((grid[..., 0] == 0) & (grid[..., 1] == 0) & (grid[..., 2] == 0)).sum()
    assert (ids == tokenizer.image_start_id).sum() == n_images > 0
    assert (ids == tokenizer.image_id).sum() * SPEC.merge_area == (grid[..., 0] >= 0).sum()
    # labels are the next token inside a document, never across a document boundary
    labels = batch["labels"][0]
    for i in torch.nonzero(labels != IGNORE_INDEX)[:, 0].tolist():
        assert labels[i] == ids[i + 1] and doc[i] == doc[i + 1]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")


def test_bad_samples_are_skipped_counted_and_reported(tokenizer, tmp_path):
    shutil.copy(f"{DATA}/images/00000.png", tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    long_caption = " ".join(["a red circle at the top left."] * 200)
    rows = [{"id": "ok1", "image": "ok.png", "caption": "a red circle."},
            {"id": "missing", "image": "nope.png", "caption": "x"},
            {"id": "corrupt", "image": "corrupt.png", "caption": "x"},
            "{not json",
            {"id": "long", "image": "ok.png", "caption": long_caption},
            {"id": "nocap", "image": "ok.png"},
            {"id": "ok2", "image": "ok.png", "caption": "a blue square."}]
    write_jsonl(tmp_path / "data.jsonl", rows)
    builder = build_document_builder(data_cfg(), tokenizer, SPEC)
    source = StreamingSource(str(tmp_path / "data.jsonl"), "captions", builder, shuffle=False, epochs=1)
    shape = RowShape(512, 20, 64, SPEC.patch_dim, 4, tokenizer.pad_id, (tokenizer.image_id,))
    rows = list(BestFitPacker(source, shape, open_bins=4))
    stats = {}
    for r in rows:
        for k, v in r["stats"].items():
            stats[k] = stats.get(k, 0) + v
    assert stats["documents"] == 2
    assert {k: stats[k] for k in ("missing_image", "corrupt_image", "malformed", "overlong")} == \
        {"missing_image": 1, "corrupt_image": 1, "malformed": 2, "overlong": 1}


def test_interleaved_documents_place_images_where_they_appear(tokenizer):
    builder = build_document_builder(data_cfg(), tokenizer, SPEC)
    content = [{"type": "image", "image": "images/00001.png"}, {"type": "text", "text": "one"},
               {"type": "image", "image": "images/00002.png"}, {"type": "text", "text": "two"}]
    doc = builder.interleaved("d", content, DATA)
    assert doc.tokens[1] == tokenizer.image_start_id
    assert len(doc.images) == 2
    starts = [i for i, t in enumerate(doc.tokens) if t == tokenizer.image_start_id]
    assert doc.tokens[starts[1] - len(tokenizer.encode("one")):starts[1]] == tokenizer.encode("one")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_with_identical_batches(tokenizer, num_workers):
    dl = loader(tokenizer, seq_len=256, num_workers=num_workers)
    it = iter(dl)
    for _ in range(7):
        next(it)
    state = dl.state_dict()
    expected = [next(it) for _ in range(6)]
    resumed = loader(tokenizer, seq_len=256, num_workers=num_workers)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for want in expected:
        got = next(it2)
        for k in ("input_ids", "labels", "pixel_values", "grid_thw", "image_token_index"):
            assert torch.equal(got[k], want[k]), k


def test_loader_shards_differ_across_ranks(tokenizer):
    def first_ids(rank):
        dl = build_dataloader(data_cfg(), tokenizer, SPEC, seq_len=256, batch_size=1, dp_rank=rank,
                              dp_world=2, seed=0)
        return next(iter(dl))["input_ids"]
    assert not torch.equal(first_ids(0), first_ids(1))


def test_a_file_whose_samples_are_all_bad_stops_with_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="every sample of this rank's shard was skipped"):
        next(iter(loader(tokenizer, path=f"{DATA}/interleaved.jsonl", dataset="captions")))


def test_a_row_too_short_for_every_sample_stops_with_a_message_instead_of_spinning(tokenizer):
    """training.seq_len = 8: every caption is overlong and skipped at packing time. The loader used
    to skip forever at 100% CPU; now a full pass over the data without one placed document ends it
    (two passes over 600 samples here, a few seconds; SIGALRM fails the test if it spins)."""
    from titan_mm.data.documents import DataError

    def spinning(signum, frame):
        raise TimeoutError("the loader is still skipping samples after 120 s")

    previous = signal.signal(signal.SIGALRM, spinning)
    signal.alarm(120)
    try:
        with pytest.raises(DataError, match=r"no sample fits a row: .*'overlong': \d+.*training.seq_len=8"):
            next(iter(loader(tokenizer, seq_len=8)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_image_budget_that_cannot_fit_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="raise patches_per_slot to 256"):
        loader(tokenizer, max_pixels=128 * 128)


@pytest.mark.parametrize("shards,batch,dp,workers,message", [
    (3, 2, 2, 0, "must be a multiple of the data-parallel degree 2"),
    (8, 3, 2, 0, "multiple of the\\s+4 data shards each rank hosts"),
    (4, 2, 2, 2, "needs data.num_workers = 0"),
])
def test_impossible_data_shard_settings_name_the_fix(shards, batch, dp, workers, message):
    from titan_mm.config import ConfigError, Data
    from titan_mm.data.dataloader import check_data_shards
    with pytest.raises(ConfigError, match=message):
        check_data_shards(Data(num_shards=shards, num_workers=workers), batch, dp)
    assert check_data_shards(Data(num_shards=4), 2, 2) == 2 and check_data_shards(Data(), 1, 4) == 1

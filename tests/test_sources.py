"""Sample sources: webdataset .tar shards, weighted mixtures, exact resume through the loader."""

import io
import json
import random
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from titan_mm.config import ConfigError, parse_args
from titan_mm.data.dataloader import build_dataloader, build_document_builder
from titan_mm.data.documents import Document
from titan_mm.data.packing import BestFitPacker, RowShape
from titan_mm.data.sources import MixtureSource
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.data.webdataset import WebDatasetSource
from titan_mm.data.packing import SIZE_STATS
from titan_mm.models.llava import FLAVORS

SPEC = FLAVORS["debug"].vision_input
DATA = "assets/sample_data"
SIZE_KEYS = SIZE_STATS


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer("assets/tokenizer")


@pytest.fixture(scope="module")
def captions():
    with open(f"{DATA}/captions_train.jsonl") as f:
        return [json.loads(line) for line in f]


def data_cfg(**kw):
    from titan_mm.config import Data
    base = dict(image_slots_per_row=20, patches_per_slot=64, min_pixels=1024, max_pixels=4096)
    base.update(kw)
    return Data(**base)


def image_bytes(path: str, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, format=fmt)
    return out.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def good_sample(key: str, cap: dict, i: int) -> list[tuple[str, bytes]]:
    """Alternates jpg/png images and .txt/.json captions."""
    image = f"{DATA}/{cap['image']}"
    img = (f"{key}.jpg", image_bytes(image, "JPEG")) if i % 2 else (f"{key}.png", image_bytes(image, "PNG"))
    text = (f"{key}.txt", cap["caption"].encode()) if i % 3 else \
        (f"{key}.json", json.dumps({"caption": cap["caption"], "url": "x"}).encode())
    return [img, text]


def bad_sample(key: str, cap: dict, kind: str) -> list[tuple[str, bytes]]:
    if kind == "corrupt_image":
        return [(f"{key}.jpg", b"\xff\xd8\xff not a jpeg"), (f"{key}.txt", cap["caption"].encode())]
    if kind == "missing_image":
        return [(f"{key}.txt", cap["caption"].encode())]
    return [(f"{key}.jpg", image_bytes(f"{DATA}/{cap['image']}", "JPEG")),
            (f"{key}.json", json.dumps({"url": "no caption"}).encode())]


def write_shards(folder, captions, n_shards: int, per_shard: int, bad: dict[int, str] = {}) -> str:
    """Shards shard-00000.tar ...; sample i is bad of kind bad[i] when listed. Returns the glob."""
    folder.mkdir(exist_ok=True)
    for s in range(n_shards):
        members = []
        for j in range(per_shard):
            i = s * per_shard + j
            key, cap = f"{i:06d}", captions[i % len(captions)]
            members += bad_sample(key, cap, bad[i]) if i in bad else good_sample(key, cap, i)
        write_tar(folder / f"shard-{s:05d}.tar", members)
    return str(folder / "shard-*.tar")


def test_webdataset_reads_jpg_png_webp_and_txt_json_captions(tokenizer, captions, tmp_path):
    image = f"{DATA}/{captions[0]['image']}"
    members = [("a.jpg", image_bytes(image, "JPEG")), ("a.json", json.dumps({"caption": "one."}).encode()),
               ("b.png", image_bytes(image, "PNG")), ("b.txt", b"two."),
               ("c.webp", image_bytes(image, "WEBP")), ("c.json", json.dumps({"txt": "three."}).encode()),
               ("d.jpeg", image_bytes(image, "JPEG")), ("d.txt", b"four.")]
    write_tar(tmp_path / "s.tar", members)
    builder = build_document_builder(data_cfg(), tokenizer, SPEC)
    source = WebDatasetSource(str(tmp_path / "*.tar"), builder, shuffle=False, epochs=1)
    samples = list(source)
    assert [doc.ref.rsplit(":", 1)[1] for _, doc in samples] == ["a", "b", "c", "d"]
    for (ref, doc), text in zip(samples, ["one.", "two.", "three.", "four."]):
        caption = tokenizer.encode(text)
        assert doc.tokens[-len(caption) - 1:-1] == caption
        assert len(doc.images) == 1
        # the packer's saved rows are rebuilt from the ref alone
        again = WebDatasetSource(str(tmp_path / "*.tar"), builder).load(ref)
        assert again.tokens == doc.tokens and torch.equal(again.images[0].patches, doc.images[0].patches)
    assert sum(source.stats.values()) == 0


def test_webdataset_skips_and_counts_bad_samples(tokenizer, captions, tmp_path):
    bad = {1: "corrupt_image", 2: "missing_image", 4: "missing_caption", 5: "missing_caption"}
    glob = write_shards(tmp_path / "wds", captions, n_shards=1, per_shard=7, bad=bad)
    builder = build_document_builder(data_cfg(), tokenizer, SPEC)
    source = WebDatasetSource(glob, builder, shuffle=False, epochs=1)
    keys = [doc.ref.rsplit(":", 1)[1] for _, doc in source]
    assert keys == ["000000", "000003", "000006"]
    assert dict(source.stats) == {"corrupt_image": 1, "missing_image": 1, "missing_caption": 2}


@pytest.mark.parametrize("n_shards,per_shard", [(5, 4), (1, 9)])
def test_webdataset_readers_split_the_samples(tokenizer, captions, tmp_path, n_shards, per_shard):
    """5 shards over 2 ranks: dealt by shard; 1 shard: split by sample index inside it."""
    glob = write_shards(tmp_path / "wds", captions, n_shards, per_shard)
    builder = build_document_builder(data_cfg(), tokenizer, SPEC)
    seen = [[ref for ref, _ in WebDatasetSource(glob, builder, dp_rank=r, dp_world=2, epochs=1)]
            for r in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == n_shards * per_shard


def mixture_loader(tokenizer, glob, num_workers, **kw):
    cfg = data_cfg(mixture_paths=[f"{DATA}/captions_train.jsonl", glob], mixture_weights=[0.6, 0.4],
                   mixture_kinds=["captions", "webdataset"], num_workers=num_workers, pack_open_bins=4, **kw)
    return build_dataloader(cfg, tokenizer, SPEC, seq_len=256, batch_size=2, dp_rank=0, dp_world=1, seed=3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixture_resumes_with_identical_batches(tokenizer, captions, tmp_path, num_workers):
    # 4 shards of 12: few enough that the run crosses epochs of the webdataset source
    glob = write_shards(tmp_path / "wds", captions, n_shards=4, per_shard=12)
    dl = mixture_loader(tokenizer, glob, num_workers)
    it = iter(dl)
    for _ in range(8):
        next(it)
    state = dl.state_dict()
    expected = [next(it) for _ in range(8)]
    resumed = mixture_loader(tokenizer, glob, num_workers)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for want in expected:
        got = next(it2)
        for k in ("input_ids", "labels", "position_ids", "pixel_values", "grid_thw", "image_token_index"):
            assert torch.equal(got[k], want[k]), k
        assert got["stats"] == want["stats"]
    counts = Counter()
    for b in expected:
        counts.update(b["stats"])
    # both sources feed the rows, and their samples add up to the documents packed (give or take open rows)
    assert counts["samples/captions_train"] > 0 and counts["samples/wds"] > 0
    assert counts["tokens/captions_train"] > counts["samples/captions_train"]


class CountingSource:
    """An endless source of one-token documents; its refs count up."""

    def __init__(self):
        self.stats, self.skipped, self.n = Counter(), [], 0

    def __iter__(self):
        while True:
            self.n += 1
            yield self.n, Document(ref=str(self.n), tokens=[1] * 3)

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_mixture_proportions_follow_the_weights_and_the_seed():
    weights = [5.0, 3.0, 2.0]
    mix = MixtureSource([CountingSource() for _ in weights], weights, ["a", "b", "c"], seed=7)
    it = iter(mix)
    picks = [next(it)[0][0] for _ in range(10_000)]
    fractions = [picks.count(i) / len(picks) for i in range(3)]
    print(f"mixture fractions {fractions} for weights 0.5/0.3/0.2")
    # binomial std at n=10000 is <= 0.005; allow 3 std
    assert all(abs(f - w / 10) < 0.015 for f, w in zip(fractions, weights))
    assert mix.stats["samples/a"] == picks.count(0) and mix.stats["tokens/c"] == 3 * picks.count(2)
    # same seed, same draws; another seed, other draws
    again = iter(MixtureSource([CountingSource() for _ in weights], weights, ["a", "b", "c"], seed=7))
    assert [next(again)[0][0] for _ in range(200)] == picks[:200]
    other = iter(MixtureSource([CountingSource() for _ in weights], weights, ["a", "b", "c"], seed=8))
    assert [next(other)[0][0] for _ in range(200)] != picks[:200]


def test_mixture_state_resumes_the_draws():
    mix = MixtureSource([CountingSource(), CountingSource()], [1, 1], ["a", "b"], seed=1)
    it = iter(mix)
    [next(it) for _ in range(50)]
    state = mix.state_dict()
    want = [next(it)[0] for _ in range(50)]
    resumed = MixtureSource([CountingSource(), CountingSource()], [1, 1], ["a", "b"], seed=1)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [next(it2)[0] for _ in range(50)] == want


def test_five_percent_corrupted_samples_are_all_counted(tokenizer, captions, tmp_path):
    n = 160
    rng = random.Random(0)
    kinds = ("corrupt_image", "missing_image", "missing_caption")
    bad = {i: kinds[k % 3] for k, i in enumerate(rng.sample(range(n), n // 20))}
    glob = write_shards(tmp_path / "wds", captions, n_shards=4, per_shard=n // 4, bad=bad)
    builder = build_document_builder(data_cfg(), tokenizer, SPEC)
    source = WebDatasetSource(glob, builder, seed=5, epochs=1)
    shape = RowShape(256, 20, 64, SPEC.patch_dim, 4, tokenizer.pad_id, (tokenizer.image_id,))
    totals = Counter()
    for row in BestFitPacker(source, shape, open_bins=4):
        totals.update(row["stats"])
    skipped = {k: v for k, v in totals.items() if k not in SIZE_KEYS}
    print(f"corrupted {len(bad)} of {n}: skipped {skipped}, documents {totals['documents']}")
    assert skipped == dict(Counter(bad.values()))
    assert totals["documents"] == n - len(bad)


def test_mixture_config_is_checked_up_front():
    cfg, _ = parse_args(["--data.mixture_paths", "a.jsonl,b/*.tar", "--data.mixture_weights", "3,1",
                         "--data.mixture_kinds", "captions,webdataset"])
    assert cfg.data.mixture_weights == [3.0, 1.0] and cfg.data.mixture_kinds == ["captions", "webdataset"]
    with pytest.raises(ConfigError, match="mixture_weights has 1 entries but data.mixture_paths has 2"):
        parse_args(["--data.mixture_paths", "a.jsonl,b.jsonl", "--data.mixture_weights", "1"])
    with pytest.raises(ConfigError, match="must all be > 0"):
        parse_args(["--data.mixture_paths", "a.jsonl,b.jsonl", "--data.mixture_weights", "1,0"])

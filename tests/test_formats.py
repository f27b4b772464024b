"""Streamed data formats (JSONL, JSON arrays, Parquet, plain text): identical documents whatever the
format, exact sharding and resume, long texts cut into chunks, bad records counted.

Every data file is written at test time under tmp_path from the bundled images and captions.
"""

import json
import pickle
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from titan_mm.config import ConfigError, Data, parse_args
from titan_mm.data.dataloader import build_dataloader, build_document_builder
from titan_mm.data.formats import JsonArrayFile
from titan_mm.data.packing import SIZE_STATS
from titan_mm.data.sources import StreamingSource
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.models.llava import FLAVORS

SPEC = FLAVORS["debug"].vision_input
DATA = Path("assets/sample_data")
BATCH_KEYS = ("input_ids", "labels", "position_ids", "document_ids", "pixel_values", "grid_thw",
              "image_token_index")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer("assets/tokenizer")


@pytest.fixture(scope="module")
def captions():
    with open(DATA / "captions_train.jsonl") as f:
        return [json.loads(line) for line in f]


def data_cfg(**kw) -> Data:
    base = dict(image_slots_per_row=20, patches_per_slot=64, min_pixels=1024, max_pixels=4096)
    base.update(kw)
    return Data(**base)


def source(tokenizer, path, kind, **kw) -> StreamingSource:
    builder = build_document_builder(data_cfg(), tokenizer, SPEC, kind)
    kw.setdefault("shuffle", False)
    kw.setdefault("epochs", 1)
    return StreamingSource(str(path), kind, builder, max_tokens=kw.pop("max_tokens", 256), **kw)


def docs_of(src) -> list:
    return [doc for _, doc in src]


def same_documents(a: list, b: list):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.targets == y.targets
        assert len(x.images) == len(y.images)
        for i, j in zip(x.images, y.images):
            assert torch.equal(i.patches, j.patches) and torch.equal(i.coords, j.coords)


def link_images(folder: Path):
    (folder / "images").symlink_to((DATA / "images").resolve())


def write_jsonl(path: Path, rows: list):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=row_group_size)


def png(name: str) -> bytes:
    return (DATA / name).read_bytes()


def chats(n: int) -> list[dict]:
    """Conversations with content as lists of parts (one Arrow type for every message)."""
    out = []
    for i in range(n):
        out.append({"id": f"c{i}", "messages": [
            {"role": "user", "content": [{"type": "image", "image": f"images/{i:05d}.png"},
                                         {"type": "text", "text": "What is in this picture?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"Shape number {i}."}]}]})
    return out


def test_chat_from_jsonl_json_and_parquet_gives_identical_documents(tokenizer, tmp_path):
    pytest.importorskip("pyarrow")
    link_images(tmp_path)
    samples = chats(6)
    write_jsonl(tmp_path / "chat.jsonl", samples)
    (tmp_path / "chat.json").write_text(json.dumps(samples, indent=1))
    # messages as a nested list-of-struct column, and as a JSON string column
    write_parquet(tmp_path / "nested.parquet", samples)
    write_parquet(tmp_path / "strings.parquet", [{"id": s["id"], "messages": json.dumps(s["messages"])}
                                                 for s in samples])
    # images as bytes in an `images` column, taken by bare {"type": "image"} parts
    with_bytes = []
    for i, s in enumerate(samples):
        messages = json.loads(json.dumps(s["messages"]))
        messages[0]["content"][0] = {"type": "image"}
        with_bytes.append({"id": s["id"], "messages": json.dumps(messages),
                           "images": [{"bytes": png(f"images/{i:05d}.png"), "path": None}]})
    write_parquet(tmp_path / "bytes.parquet", with_bytes)
    reference = docs_of(source(tokenizer, tmp_path / "chat.jsonl", "chat"))
    assert all(len(d.images) == 1 for d in reference)
    for name in ("chat.json", "nested.parquet", "strings.parquet", "bytes.parquet"):
        same_documents(docs_of(source(tokenizer, tmp_path / name, "chat")), reference)


def test_obelics_parquet_maps_to_interleaved_documents(tokenizer, tmp_path):
    pytest.importorskip("pyarrow")
    link_images(tmp_path)
    rows, content_rows = [], []
    for i in range(4):
        images = [f"images/i{i:05d}_0.png", f"images/i{i:05d}_1.png"]
        # an image as a {bytes, path} struct and as a path string (Arrow needs one type: structs)
        rows.append({"id": f"o{i}", "texts": ["A page.", None, "Between.", None],
                     "images": [None, {"bytes": png(images[0]), "path": None}, None,
                                {"bytes": None, "path": images[1]}]})
        content_rows.append({"id": f"o{i}", "content": [
            {"type": "text", "text": "A page."}, {"type": "image", "image": images[0]},
            {"type": "text", "text": "Between."}, {"type": "image", "image": images[1]}]})
    rows.append({"id": "both", "texts": ["x", None], "images": [{"bytes": b"x", "path": None}, None]})
    rows.append({"id": "lengths", "texts": ["x"], "images": [None, None]})
    write_parquet(tmp_path / "obelics.parquet", rows)
    write_jsonl(tmp_path / "content.jsonl", content_rows)
    src = source(tokenizer, tmp_path / "obelics.parquet", "interleaved")
    same_documents(docs_of(src), docs_of(source(tokenizer, tmp_path / "content.jsonl", "interleaved")))
    assert src.stats == Counter(malformed=2)
    assert any("obelics.parquet:row group 0 row 4 (both)" in s for s in src.skipped)


def test_captions_parquet_reads_image_bytes(tokenizer, captions, tmp_path):
    pytest.importorskip("pyarrow")
    link_images(tmp_path)
    rows = [{"id": c["id"], "image": png(c["image"]), "caption": c["caption"]} for c in captions[:5]]
    write_parquet(tmp_path / "caps.parquet", rows)
    write_jsonl(tmp_path / "caps.jsonl", captions[:5])
    same_documents(docs_of(source(tokenizer, tmp_path / "caps.parquet", "captions")),
                   docs_of(source(tokenizer, tmp_path / "caps.jsonl", "captions")))


def test_unreadable_parquet_file_is_counted_and_the_others_are_read(tokenizer, captions, tmp_path):
    pytest.importorskip("pyarrow")
    link_images(tmp_path)
    write_parquet(tmp_path / "a.parquet", captions[:4])
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    src = source(tokenizer, str(tmp_path / "*.parquet"), "captions")
    assert len(docs_of(src)) == 4 and src.stats == Counter(corrupt_file=1)
    assert "b.parquet: cannot read Parquet" in src.skipped[0]


def test_long_texts_are_cut_into_seq_len_chunks_not_skipped(tokenizer, tmp_path):
    pytest.importorskip("pyarrow")
    long_text = " ".join(f"word{i} of a long document." for i in range(300))
    paragraphs = ["A short paragraph\non two lines.", long_text, "The last one."]
    (tmp_path / "corpus.txt").write_text("\n\n\n".join(paragraphs) + "\n")
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": p} for p in paragraphs])
    write_parquet(tmp_path / "corpus.parquet", [{"text": p} for p in paragraphs])
    reference = docs_of(source(tokenizer, tmp_path / "corpus.txt", "text", max_tokens=100))
    for name in ("corpus.jsonl", "corpus.parquet"):
        same_documents(docs_of(source(tokenizer, tmp_path / name, "text", max_tokens=100)), reference)
    # every token of every paragraph is there, in order, in chunks of at most 100 tokens
    stream = [t for d in reference for t in d.tokens]
    want = [t for p in paragraphs for t in [tokenizer.bos_id] + tokenizer.encode(p) + [tokenizer.eos_id]]
    assert stream == want
    long_ids = len(tokenizer.encode(long_text)) + 2
    assert [len(d.tokens) for d in reference[1:-1]] == [100] * (long_ids // 100) + [long_ids % 100]
    # every token but each text's <bos> is a target
    assert [t for d in reference for t in d.targets].count(False) == len(paragraphs)
    assert reference[2].ref.endswith(f"corpus.txt:5 chunk 2/{-(-long_ids // 100)}")
    # text_split = "file": the whole file is one document
    whole = docs_of(source(tokenizer, tmp_path / "corpus.txt", "text", max_tokens=10_000, text_split="file"))
    assert len(whole) == 1 and len(whole[0].tokens) == len(tokenizer.encode((tmp_path / "corpus.txt").read_text().rstrip("\n"))) + 2


def test_json_array_is_decoded_element_by_element(tokenizer, captions, tmp_path):
    """Read in 7-byte chunks: elements, numbers and multi-byte characters straddle chunk ends."""
    link_images(tmp_path)
    rows = [dict(c, caption=c["caption"] + " é ü 形", n=12345.678) for c in captions[:8]]
    (tmp_path / "caps.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2))
    write_jsonl(tmp_path / "caps.jsonl", rows)
    small_chunks = source(tokenizer, tmp_path / "caps.json", "captions")
    for f in small_chunks.files.values():
        f.CHUNK = 7
    same_documents(docs_of(small_chunks), docs_of(source(tokenizer, tmp_path / "caps.jsonl", "captions")))
    # element positions read back alone
    f = JsonArrayFile(str(tmp_path / "caps.json"))
    records = list(f.records(0, None))
    assert [r for _, _, r in records] == rows
    assert all(f.read(position) == r for position, _, r in records)
    # a syntax error ends the file, counted once; the elements before it are trained on
    text = json.dumps(rows[:3])
    (tmp_path / "broken.json").write_text(text[:-1] + ", {\"id\": oops}]")
    broken = source(tokenizer, tmp_path / "broken.json", "captions")
    assert len(docs_of(broken)) == 3 and broken.stats == Counter(malformed=1)


def make_files(tmp_path, captions) -> dict[str, Path]:
    """A JSONL of 23 captions, a Parquet of 23 captions in 5 row groups, a .txt of 23 paragraphs."""
    pytest.importorskip("pyarrow")
    link_images(tmp_path)
    write_jsonl(tmp_path / "caps.jsonl", captions[:23])
    write_parquet(tmp_path / "caps.parquet", captions[23:46], row_group_size=5)
    (tmp_path / "text.txt").write_text("\n\n".join(f"paragraph {i} about shapes." for i in range(23)))
    return {"captions": tmp_path / "caps.jsonl", "parquet": tmp_path / "caps.parquet", "text": tmp_path / "text.txt"}


@pytest.mark.parametrize("name,readers", [("captions", 3), ("parquet", 3), ("parquet", 7), ("text", 4)])
def test_each_sample_goes_to_exactly_one_reader_per_epoch(tokenizer, captions, tmp_path, name, readers):
    """dp ranks x workers readers (3 <= 5 row groups: dealt by row group; 7: by row): over two
    epochs every sample is seen exactly once per epoch, and the epochs come in different orders."""
    path = make_files(tmp_path, captions)[name]
    kind = "text" if name == "text" else "captions"
    epochs = []
    for epoch in range(2):
        seen = []
        for rank in range(readers):
            src = source(tokenizer, path, kind, dp_rank=rank, dp_world=readers, shuffle=True,
                         shuffle_buffer=4, seed=11, epochs=epoch + 1)
            src.epoch = epoch
            seen.append([ref for ref, _ in src])
        assert all(seen), "every reader gets samples"
        flat = [ref for refs in seen for ref in refs]
        assert len(flat) == len(set(flat)) == 23
        epochs.append(flat)
    assert set(epochs[0]) == set(epochs[1]) and epochs[0] != epochs[1]


@pytest.mark.parametrize("name", ["captions", "parquet", "text"])
def test_source_state_resumes_inside_the_shuffle_buffer_and_a_long_text(tokenizer, captions, tmp_path, name):
    path = make_files(tmp_path, captions)[name]
    kind = "text" if name == "text" else "captions"
    if name == "text":  # a long paragraph is cut into chunks; stop between two of them
        path.write_text(path.read_text() + "\n\n" + " ".join(["a long paragraph."] * 200))
    kw = dict(shuffle=True, shuffle_buffer=6, seed=3, epochs=None, max_tokens=64)
    straight = source(tokenizer, path, kind, **kw)
    it = iter(straight)
    refs = [next(it)[0] for _ in range(60)]  # crosses into the third epoch
    for stop in (1, 7, 22, 23, 40):
        first = source(tokenizer, path, kind, **kw)
        it = iter(first)
        for _ in range(stop):
            next(it)
        state = pickle.loads(pickle.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = source(tokenizer, path, kind, **kw)
        resumed.load_state_dict(state)
        it = iter(resumed)
        assert [next(it)[0] for _ in range(60 - stop)] == refs[stop:], stop


def mixture_loader(tokenizer, files, num_workers):
    cfg = data_cfg(mixture_paths=[str(files["captions"]), str(files["parquet"]), str(files["text"])],
                   mixture_weights=[0.5, 0.3, 0.2], mixture_kinds=["captions", "captions", "text"],
                   num_workers=num_workers, pack_open_bins=4, shuffle_buffer=5)
    return build_dataloader(cfg, tokenizer, SPEC, seq_len=256, batch_size=2, dp_rank=0, dp_world=1, seed=3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streamed_mixture_resumes_with_identical_batches(tokenizer, captions, tmp_path, num_workers):
    """JSONL + Parquet captions + .txt text, weighted, shuffled and packed: the batches after a
    resume equal bit for bit those of the run that went on (which crosses epochs of every source)."""
    files = make_files(tmp_path, captions)
    dl = mixture_loader(tokenizer, files, num_workers)
    it = iter(dl)
    for _ in range(9):
        next(it)
    state = dl.state_dict()
    expected = [next(it) for _ in range(9)]
    resumed = mixture_loader(tokenizer, files, num_workers)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for want in expected:
        got = next(it2)
        for k in BATCH_KEYS:
            assert torch.equal(got[k], want[k]), k
        assert got["stats"] == want["stats"]
    counts = Counter()
    for b in expected:
        counts.update(b["stats"])
    assert all(counts[f"samples/{n}"] > 0 for n in ("caps_0", "caps_1", "text")), counts


def test_bad_paths_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown extension '.csv'"):
        parse_args(["--data.path", "data/train.csv"])
    with pytest.raises(ConfigError, match="set data.dataset = 'text'"):
        parse_args(["--data.path", "corpus/*.txt", "--data.dataset", "chat"])
    with pytest.raises(ConfigError, match="webdataset reads .tar shards only"):
        parse_args(["--data.mixture_paths", "a.jsonl,b.jsonl", "--data.mixture_weights", "1,1",
                    "--data.mixture_kinds", "captions,webdataset"])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # the import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'titan_mm\[parquet\]'"):
        parse_args(["--data.path", "chat.parquet", "--data.dataset", "chat"])


class ListHandler:
    """Collects the messages of one logger (the logging plugin is off in these runs)."""

    def __init__(self, name: str):
        import logging
        self.messages: list[str] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        self.logger = logging.getLogger(name)
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)

    def close(self):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def test_run_with_five_percent_corrupted_samples_finishes_and_counts_each(captions, tmp_path):
    """train.py on 100 captions of which 5 are bad (missing image, corrupt image, invalid JSON, no
    caption, overlong): it trains through the whole epoch, and its skip counts are exactly the 5."""
    from conftest import make_config
    import train

    link_images(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    n, first_clean = 100, 30
    bad_kinds = ["missing_image", "corrupt_image", "malformed", "malformed", "overlong"]
    # the first 30 lines are good: the run reads into the next epoch, but not that far
    positions = sorted(random.Random(0).sample(range(first_clean, n), n // 20))
    rows = [dict(c) for c in captions[:n]]
    expected = Counter()
    for k, i in enumerate(positions):
        kind = bad_kinds[k % len(bad_kinds)]
        expected[kind] += 1
        rows[i] = {"missing_image": {"id": f"bad{i}", "image": "images/nope.png", "caption": "x"},
                   "corrupt_image": {"id": f"bad{i}", "image": "corrupt.png", "caption": "x"},
                   "overlong": dict(rows[i], caption=" ".join(["a red circle."] * 300))}.get(kind, rows[i])
        if kind == "malformed":
            rows[i] = "{not json" if k % 2 else {"id": f"bad{i}", "image": rows[i]["image"]}
    write_jsonl(tmp_path / "train.jsonl", rows)

    args = ["--data.path", str(tmp_path / "train.jsonl"), "--data.shuffle", "false",
            "--training.seq_len", "256", "--data.image_slots_per_row", "10", "--data.pack_open_bins", "4",
            "--metrics.log_freq", "5",
            "--checkpoint.enable", "false"]
    # steps: the first batch made after the source began its second epoch
    cfg = make_config(tmp_path / "probe", *args)
    tok = Tokenizer(cfg.model.tokenizer_path)
    loader = build_dataloader(cfg.data, tok, SPEC, seq_len=256, batch_size=1, dp_rank=0, dp_world=1, seed=0)
    source, steps = loader.dataset.source, 0
    for steps, _ in enumerate(loader, start=1):
        if source.epoch == 1:
            break
    assert source.walked < first_clean  # read into epoch 2 no further than its clean lines

    log = ListHandler("titan_mm.train.metrics")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the debug model's steps are tiny: more threads only contend for cores
    try:
        trainer = train.Trainer(make_config(tmp_path, *args, "--training.steps", str(steps)))
        trainer.train()
    finally:
        torch.set_num_threads(threads)
        log.close()
    totals = trainer.metrics.data_totals
    skipped = Counter({k: v for k, v in totals.items() if k not in SIZE_STATS})
    print(f"{steps} steps over {n} samples, {len(positions)} corrupted: skipped {dict(skipped)}")
    assert skipped == expected and sum(skipped.values()) == n // 20
    # the progress lines name skipped samples by file:line and id
    named = [m for m in log.messages if "skipped since the last log line" in m]
    lines = [int(re.search(r"train\.jsonl:(\d+)", m).group(1)) for m in named]
    assert lines and all(line - 1 in positions for line in lines), named


def test_progress_line_shows_each_source_and_its_share_of_tokens():
    from titan_mm.train.metrics import MetricsLogger
    log = ListHandler("titan_mm.train.metrics")
    try:
        metrics = MetricsLogger(log_freq=1, total_steps=1, tb_folder=None, peak_tflops=0, world_size=1,
                                device=torch.device("cpu"))
        metrics.record_step(tokens=10, flops=0, data_stats={}, skipped=["corrupt_image a.jsonl:3 (x): bad"])
        totals = {"samples/caps": 30, "tokens/caps": 600, "samples/text": 5, "tokens/text": 200, "malformed": 1}
        metrics.log(1, loss=1.0, grad_norm=1.0, lr=1e-3, row_slots=256, data_totals=totals)
    finally:
        log.close()
    assert "skipped 1 {'malformed': 1}" in log.messages[0]
    assert log.messages[0].endswith("sources caps 30 (75%) text 5 (25%)")
    assert log.messages[1].endswith("skipped since the last log line: corrupt_image a.jsonl:3 (x): bad")

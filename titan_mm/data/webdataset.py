"""Image-caption pairs from .tar shards in the webdataset layout (CC12M as written by img2dataset).

A shard holds samples as consecutive members sharing a key: ``KEY.jpg`` (or png, jpeg, webp) and
``KEY.txt`` or ``KEY.json`` (a ``"caption"`` or ``"txt"`` field). Shards are read with the stdlib
tarfile, one at a time: only the open shard's member index (names and byte offsets) is held, and
an image is decoded from the tar bytes when its sample is built.

Shards are dealt to (dp rank, loader worker) readers in a per-epoch shuffled order; with fewer
shards than readers every reader walks every shard and takes every readers-th sample of each.
The state (epoch, shard position, sample position inside the shard) is the whole position, so
resume is exact. A sample's reference is (shard path, byte offset of its first member).
"""

import glob
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils.data import get_worker_info

from titan_mm.config import ConfigError
from titan_mm.data.documents import DataError, Document, DocumentBuilder, SampleError
from titan_mm.data.sources import count_skip

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class TarSample:
    key: str
    offset: int
    """Byte offset of the header of the sample's first member (its reference inside the shard)."""
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    """Extension (lower case, e.g. "jpg", "json") -> member."""


def index_shard(path: str) -> list[TarSample]:
    """The samples of one shard in file order, from its member headers (no member data is read)."""
    samples: list[TarSample] = []
    by_key: dict[str, TarSample] = {}
    with tarfile.open(path, "r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = os.path.join(folder, stem)
            if key not in by_key:
                by_key[key] = TarSample(key, member.offset)
                samples.append(by_key[key])
            by_key[key].members[ext.lower()] = member
    return samples


def expand_shards(pattern: str) -> list[str]:
    """Shard files of a glob (or a comma-separated list of globs), sorted."""
    shards = sorted({p for part in pattern.split(",") if part for p in glob.glob(part)})
    shards = [p for p in shards if os.path.isfile(p)]
    if not shards:
        raise ConfigError(f"no .tar shards match {pattern!r} (set data.path to a glob such as "
                          f"'/data/cc12m/*.tar')")
    return shards


class WebDatasetSource:
    def __init__(self, path: str, builder: DocumentBuilder, *, dp_rank: int = 0, dp_world: int = 1,
                 seed: int = 0, shuffle: bool = True, epochs: int | None = None):
        self.path, self.shards, self.builder = path, expand_shards(path), builder
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.epoch, self.shard_pos, self.sample_pos = 0, 0, 0
        self.stats: Counter = Counter()
        self.skipped: list[str] = []
        self._index: tuple[str, list[TarSample], dict[int, TarSample]] | None = None

    def _plan(self, epoch: int) -> tuple[list[str], int, int]:
        """This reader's shards for ``epoch``, and the stride and start of its samples in each."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.dp_rank * n_workers + worker, self.dp_world * n_workers
        order = list(range(len(self.shards)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.shards), generator=g).tolist()
        shards = [self.shards[i] for i in order]
        if len(shards) >= readers:
            return shards[reader::readers], 1, 0
        # fewer shards than readers: split inside shards by sample index
        return shards, readers, reader

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            shards, stride, start = self._plan(self.epoch)
            produced, full_pass = 0, self.shard_pos == 0 and self.sample_pos == 0
            while self.shard_pos < len(shards):
                samples = self._samples(shards[self.shard_pos])
                mine = samples[start::stride]
                while self.sample_pos < len(mine):
                    sample = mine[self.sample_pos]
                    self.sample_pos += 1
                    doc = self._load(shards[self.shard_pos], sample, count_skips=True)
                    if doc is not None:
                        produced += 1
                        yield (shards[self.shard_pos], sample.offset), doc
                self.shard_pos, self.sample_pos = self.shard_pos + 1, 0
            if produced == 0 and full_pass:
                raise DataError(f"{self.path}: no usable sample for dp rank {self.dp_rank} in "
                                 f"{len(shards)} shards ({dict(self.stats)}); check the shards, or "
                                 f"use fewer loader workers")
            self.epoch, self.shard_pos = self.epoch + 1, 0

    def _samples(self, shard: str) -> list[TarSample]:
        """The member index of ``shard``; only the last shard's is kept."""
        if self._index is None or self._index[0] != shard:
            try:
                samples = index_shard(shard)
            except (OSError, tarfile.TarError) as e:
                count_skip(self, SampleError("corrupt_shard", f"{shard}: unreadable shard ({e})"))
                samples = []
            self._index = (shard, samples, {s.offset: s for s in samples})
        return self._index[1]

    def load(self, ref: tuple[str, int]) -> Document | None:
        """Rebuild the sample at ``ref`` = (shard path, offset of its first member)."""
        shard, offset = ref
        self._samples(shard)
        return self._load(shard, self._index[2][offset], count_skips=False)

    def _load(self, shard: str, sample: TarSample, count_skips: bool) -> Document | None:
        ref = f"{shard}:{sample.key}"
        try:
            with open(shard, "rb") as f:
                return self._build(ref, f, sample)
        except SampleError as e:
            if count_skips:
                count_skip(self, e)
            return None

    def _build(self, ref: str, f, sample: TarSample) -> Document:
        caption = self._caption(ref, f, sample)
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
        if ext is None:
            raise SampleError("missing_image", f"{ref}: no {'/'.join(IMAGE_EXTENSIONS)} member")
        image = io.BytesIO(_read(f, sample.members[ext]))
        image.name = f"{ref}.{ext}"  # named in decode errors
        return self.builder.caption(ref, image, caption)

    @staticmethod
    def _caption(ref: str, f, sample: TarSample) -> str:
        caption = None
        if "txt" in sample.members:
            caption = _read(f, sample.members["txt"]).decode("utf-8", errors="replace")
        elif "json" in sample.members:
            try:
                meta = json.loads(_read(f, sample.members["json"]))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SampleError("malformed", f"{ref}.json: invalid JSON ({e})") from None
            if isinstance(meta, dict):
                caption = meta.get("caption", meta.get("txt"))
        if not isinstance(caption, str) or not caption.strip():
            raise SampleError("missing_caption", f"{ref}: no caption (.txt, or .json 'caption'/'txt')")
        return caption.strip()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "sample_pos": self.sample_pos,
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict):
        self.epoch, self.shard_pos, self.sample_pos = state["epoch"], state["shard_pos"], state["sample_pos"]
        self.stats = Counter(state["stats"])


def _read(f, member: tarfile.TarInfo) -> bytes:
    f.seek(member.offset_data)
    return f.read(member.size)

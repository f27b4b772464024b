"""Sample sources: data files streamed record by record, sharded by data-parallel rank and loader
worker; weighted mixtures of sources. (Webdataset .tar shards: titan_mm/data/webdataset.py; the
file formats: titan_mm/data/formats.py; records -> documents: titan_mm/data/samples.py.)

A source yields ``(ref, Document)``; ``load(ref)`` rebuilds the document; ``epoch`` counts the full
passes made (the packer stops a run in which a whole pass fits nothing). Bad samples are skipped,
counted in ``stats`` by reason, and their references kept in ``skipped`` until the packer reports
them. A source's position is its whole state, so resume is exact.
"""

import bisect
import contextlib
import glob
import logging
import os
import random
from collections import Counter

import torch
from torch.utils.data import get_worker_info

from titan_mm.config import ConfigError
from titan_mm.data.documents import DataError, Document, DocumentBuilder, SampleError
from titan_mm.data.formats import open_record_file
from titan_mm.data.samples import SampleDecoder

logger = logging.getLogger(__name__)

MAX_SKIP_WARNINGS = 20
"""Skips logged as warnings by one process; later ones are only counted and reported by the packer."""
MAX_SKIPS_REPORTED = 5
"""References of the latest skipped samples a source keeps for the progress line."""
_skips_logged = 0
_skip_warnings = True


def count_skip(source, error: SampleError):
    """Count a skipped sample of ``source`` under its reason, keep its reference; log the first few."""
    global _skips_logged
    source.stats[error.kind] += 1
    source.skipped = (source.skipped + [f"{error.kind} {error}"[:300]])[-MAX_SKIPS_REPORTED:]
    if not _skip_warnings:
        return
    _skips_logged += 1
    if _skips_logged <= MAX_SKIP_WARNINGS:
        logger.warning("skipping sample (%s): %s", error.kind, error)


@contextlib.contextmanager
def skips_counted_only():
    """Skips inside are counted but not logged, and leave the process's warnings to later skips
    (a padding estimate reports its own)."""
    global _skip_warnings
    _skip_warnings = False
    try:
        yield
    finally:
        _skip_warnings = True


def reader_index(dp_rank: int, dp_world: int) -> tuple[int, int]:
    """(this reader, readers): every (dp rank, loader worker) pair reads its own share."""
    info = get_worker_info()
    worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
    return dp_rank * n_workers + worker, dp_world * n_workers


def expand_paths(pattern: str) -> list[str]:
    """Files of a path or glob (or a comma-separated list of them), sorted."""
    paths = []
    for part in (p.strip() for p in pattern.split(",")):
        if not part:
            continue
        found = sorted(p for p in glob.glob(part) if os.path.isfile(p))
        if not found:
            raise ConfigError(f"data file {part} not found (set data.path or data.mixture_paths)")
        paths += found
    return sorted(set(paths))


class StreamingSource:
    """Samples of JSONL, JSON, Parquet or .txt files (a path or glob), streamed.

    Each epoch, the files' units (a file, or a Parquet row group) are put in an order seeded by
    (seed, epoch). With at least as many units as readers (dp ranks x loader workers), units are
    dealt round-robin to readers; with fewer, every reader walks every unit and takes every
    readers-th record. Either way each record goes to exactly one reader per epoch. A reader keeps
    ``shuffle_buffer`` records and yields one drawn at random (seeded by seed, epoch, reader and
    draw number) as each new record comes in, so an epoch is shuffled beyond the file order;
    the buffer is emptied at the end of each epoch. Images and videos are decoded when a record is
    drawn, in the loader worker.

    State: epoch, unit, position inside it, records walked, draws, and the buffered records as
    references (read again on resume), so a resumed reader continues exactly.
    """

    def __init__(self, path: str, kind: str, builder: DocumentBuilder, *, max_tokens: int | None = None,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1000, text_split: str = "paragraph", epochs: int | None = None):
        if kind == "text" and max_tokens is None:
            raise ValueError("text sources need max_tokens (training.seq_len) to cut long texts")
        self.path, self.kind = path, kind
        self.files = {p: open_record_file(p, kind, text_split) for p in expand_paths(path)}
        self.decode = SampleDecoder(kind, builder, max_tokens or 0)
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.seed, self.epochs = seed, epochs
        self.capacity = max(1, shuffle_buffer) if shuffle else 1
        self.shuffle = shuffle
        self.epoch, self.unit_pos, self.start, self.walked, self.draws = 0, 0, None, 0, 0
        self.buffer: list[tuple[tuple, object]] = []
        """(record ref, record) read but not yet yielded; a record ref is (file path, position)."""
        self.pending: tuple[tuple, int] | None = None
        """(record ref, next chunk) while a long text's chunks are being yielded."""
        self.stats: Counter = Counter()
        self.skipped: list[str] = []
        self._units: list[tuple[str, int]] | None = None

    def _all_units(self) -> list[tuple[str, int]]:
        """(file, unit) of every file, in path order; a file that cannot be opened is counted once."""
        if self._units is None:
            self._units = []
            for path, f in self.files.items():
                try:
                    self._units += [(path, u) for u in f.units()]
                except SampleError as e:
                    count_skip(self, e)
        return self._units

    def _plan(self, epoch: int) -> tuple[list[tuple[str, int]], int, int]:
        """This reader's units for ``epoch``, and the stride and first index of its records in them."""
        reader, readers = reader_index(self.dp_rank, self.dp_world)
        units = self._all_units()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            units = [units[i] for i in torch.randperm(len(units), generator=g).tolist()]
        if len(units) >= readers:
            return units[reader::readers], 1, 0
        return units, readers, reader

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            full_pass = self.unit_pos == 0 and self.start is None and not self.buffer and not self.pending
            produced = 0
            if self.pending is not None:
                ref, first_chunk = self.pending
                for item in self._yield_docs(ref, self._read(ref), first_chunk):
                    produced += 1
                    yield item
            units, stride, first = self._plan(self.epoch)
            while self.unit_pos < len(units):
                path, unit = units[self.unit_pos]
                for position, next_start, record in self._records(path, unit):
                    self.start = next_start
                    self.walked += 1
                    if (self.walked - 1) % stride != first:
                        continue
                    self.buffer.append(((path, position), record))
                    if len(self.buffer) >= self.capacity:
                        for item in self._draw():
                            produced += 1
                            yield item
                self.unit_pos, self.start = self.unit_pos + 1, None
            while self.buffer:
                for item in self._draw():
                    produced += 1
                    yield item
            if produced == 0 and full_pass:
                raise DataError(f"{self.path}: every sample of this rank's shard was skipped or the "
                                 f"shard is empty ({dict(self.stats)}); check data.dataset={self.kind!r}, "
                                 f"the files, and that there are more samples than dp ranks x workers")
            self.epoch, self.unit_pos, self.walked, self.draws = self.epoch + 1, 0, 0, 0

    def _records(self, path: str, unit: int):
        try:
            yield from self.files[path].records(unit, self.start)
        except SampleError as e:  # the file cannot be read on: the rest of this unit is lost
            count_skip(self, e)

    def _draw(self):
        """Yield the documents of one buffered record, drawn at random (the oldest without shuffle)."""
        i = 0
        if self.shuffle:
            reader, _ = reader_index(self.dp_rank, self.dp_world)
            # a str seed is hashed with sha512: the same on every run and platform
            i = random.Random(f"{self.seed}/{self.epoch}/{reader}/{self.draws}").randrange(len(self.buffer))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        ref, record = self.buffer.pop()
        self.draws += 1
        yield from self._yield_docs(ref, record, 0)

    def _yield_docs(self, ref: tuple, record, first_chunk: int):
        docs = self._documents(ref, record, count_skips=True)
        for chunk in range(first_chunk, len(docs)):
            self.pending = (ref, chunk + 1) if chunk + 1 < len(docs) else None
            yield (ref, chunk), docs[chunk]
        self.pending = None

    def _documents(self, ref: tuple, record, count_skips: bool) -> list[Document]:
        path, position = ref
        try:
            return self.decode(self.files[path].describe(position), record, os.path.dirname(path))
        except SampleError as e:
            if count_skips:
                count_skip(self, e)
            return []

    def _read(self, ref: tuple):
        path, position = ref
        return self.files[path].read(position)

    def load(self, ref) -> Document | None:
        """The document at ``ref`` = (record ref, chunk), or None if it must be skipped."""
        record_ref, chunk = ref
        docs = self._documents(record_ref, self._read(record_ref), count_skips=False)
        return docs[chunk] if chunk < len(docs) else None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "unit_pos": self.unit_pos, "start": self.start,
                "walked": self.walked, "draws": self.draws, "buffer": [ref for ref, _ in self.buffer],
                "pending": self.pending, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict):
        self.epoch, self.unit_pos, self.start = state["epoch"], state["unit_pos"], state["start"]
        self.walked, self.draws, self.pending = state["walked"], state["draws"], state["pending"]
        self.buffer = [(ref, self._read(ref)) for ref in state["buffer"]]
        self.stats = Counter(state["stats"])


class ListSource:
    """A finite, in-order source over ready-made documents (evaluation and tests)."""

    epoch = 0
    """Full passes made (a ListSource makes one)."""

    def __init__(self, docs: list[Document]):
        self.docs = docs
        self.stats: Counter = Counter()
        self.skipped: list[str] = []

    def __iter__(self):
        yield from enumerate(self.docs)

    def load(self, index: int) -> Document:
        return self.docs[index]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class MixtureSource:
    """Draws each sample from one of ``sources`` with probability proportional to its weight.

    The draws come from a seeded generator keyed by (seed, dp rank, worker, draw number), so the
    number of draws is the generator's whole state: with every sub-source's position, it makes
    resume exact. ``stats`` counts each source's samples and tokens under ``samples/NAME`` and
    ``tokens/NAME``, next to the sub-sources' skip counts.
    """

    def __init__(self, sources: list, weights: list[float], names: list[str], *, seed: int = 0,
                 dp_rank: int = 0):
        if not len(sources) == len(weights) == len(names) or not sources:
            raise ValueError(f"a mixture needs one weight and name per source, got {len(sources)} "
                             f"sources, {len(weights)} weights, {len(names)} names")
        if any(not w > 0 for w in weights):
            raise ValueError(f"mixture weights must be > 0, got {weights}")
        total = sum(weights)
        self.cumulative = [sum(weights[:i + 1]) / total for i in range(len(weights))]
        self.sources, self.names = sources, names
        self.seed, self.dp_rank = seed, dp_rank
        self.draws = 0
        self.stats: Counter = Counter()
        self.skipped: list[str] = []

    @property
    def epoch(self) -> int:
        """Full passes made over every source."""
        return min(s.epoch for s in self.sources)

    def _draw(self) -> int:
        info = get_worker_info()
        worker = info.id if info else 0
        # a str seed is hashed with sha512: the same on every run and platform
        u = random.Random(f"{self.seed}/{self.dp_rank}/{worker}/{self.draws}").random()
        return min(bisect.bisect_right(self.cumulative, u), len(self.sources) - 1)

    def __iter__(self):
        streams = [iter(s) for s in self.sources]
        while True:
            i = self._draw()
            try:
                ref, doc = next(streams[i])
            except StopIteration:  # a finite sub-source ran out: so does the mixture
                self._collect_skips()
                return
            self.draws += 1
            self._collect_skips()
            self.stats[f"samples/{self.names[i]}"] += 1
            self.stats[f"tokens/{self.names[i]}"] += len(doc.tokens)
            yield (i, ref), doc

    def _collect_skips(self):
        """Move the sub-sources' skip counts and references here, where the packer reports them."""
        for sub in self.sources:
            self.stats.update(sub.stats)
            sub.stats.clear()
            self.skipped = (self.skipped + sub.skipped)[-MAX_SKIPS_REPORTED:]
            sub.skipped = []

    def load(self, ref) -> Document | None:
        i, sub_ref = ref
        return self.sources[i].load(sub_ref)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "stats": dict(self.stats),
                "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict):
        self.draws, self.stats = state["draws"], Counter(state["stats"])
        for s, sub in zip(self.sources, state["sources"]):
            s.load_state_dict(sub)


def source_name(path: str) -> str:
    """A short name for a source in logs: its file or folder name without extension or globs."""
    parts = [p for p in path.replace("\\", "/").split("/") if p and not any(c in p for c in "*?[")]
    return os.path.splitext(parts[-1])[0] if parts else "source"

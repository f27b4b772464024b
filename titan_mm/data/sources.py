"""Sample sources: JSONL files of captions, interleaved documents or conversations, sharded by rank
and worker; weighted mixtures of sources. (Webdataset .tar shards: titan_mm/data/webdataset.py.)

A source yields ``(ref, Document)``; ``load(ref)`` rebuilds the document. Bad samples are skipped and
counted in ``stats`` by kind. Its position (epoch, offset into this shard's order) is its whole
state, so resume is exact.
"""

import bisect
import json
import logging
import os
import random
from collections import Counter

import torch
from torch.utils.data import get_worker_info

from titan_mm.data.documents import Document, DocumentBuilder, SampleError

logger = logging.getLogger(__name__)

MAX_SKIP_WARNINGS = 20


def count_skip(stats: Counter, error: SampleError):
    """Count a skipped sample under its reason; log the first few."""
    stats[error.kind] += 1
    if sum(stats.values()) <= MAX_SKIP_WARNINGS:
        logger.warning("skipping sample (%s): %s", error.kind, error)


class JsonlSource:
    def __init__(self, path: str, kind: str, builder: DocumentBuilder, *, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0, shuffle: bool = True, epochs: int | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path} not found (set data.path)")
        with open(path, encoding="utf-8") as f:
            self.lines = [line for line in f if line.strip()]
        if not self.lines:
            raise ValueError(f"data file {path} has no samples")
        self.path, self.kind, self.builder = path, kind, builder
        self.root = os.path.dirname(os.path.abspath(path))
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.epoch, self.offset = 0, 0
        self.stats: Counter = Counter()

    def _shard_order(self, epoch: int) -> list[int]:
        """This rank's and this worker's sample indices for ``epoch``."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        n = len(self.lines)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        shard = self.dp_rank * n_workers + worker
        return order[shard::self.dp_world * n_workers]

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            order = self._shard_order(self.epoch)
            if not order:
                raise ValueError(f"{self.path}: {len(self.lines)} samples cannot feed "
                                 f"{self.dp_world} ranks x workers; use fewer workers")
            produced, full_pass = 0, self.offset == 0
            while self.offset < len(order):
                index = order[self.offset]
                self.offset += 1
                doc = self.load(index, count_skips=True)
                if doc is not None:
                    produced += 1
                    yield index, doc
            if produced == 0 and full_pass:
                raise ValueError(f"{self.path}: every sample of this rank's shard was skipped "
                                 f"({dict(self.stats)}); check data.dataset={self.kind!r} and the files")
            self.epoch, self.offset = self.epoch + 1, 0

    def load(self, index: int, count_skips: bool = False) -> Document | None:
        """The document of sample ``index``, or None (counted, logged) if it must be skipped."""
        ref = f"{self.path}:{index + 1}"
        try:
            return self._build(ref, self.lines[index])
        except SampleError as e:
            if count_skips:
                count_skip(self.stats, e)
            return None

    def _build(self, ref: str, line: str) -> Document:
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as e:
            raise SampleError("malformed", f"{ref}: invalid JSON ({e})") from None
        if not isinstance(sample, dict):
            raise SampleError("malformed", f"{ref}: a sample must be a JSON object")
        ref = f"{ref} ({sample.get('id', 'no id')})"
        if self.kind == "captions":
            image, caption = sample.get("image"), sample.get("caption")
            if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
                raise SampleError("malformed", f"{ref}: needs string fields 'image' and 'caption'")
            return self.builder.caption(ref, os.path.join(self.root, image), caption)
        if self.kind == "chat":
            return self.builder.chat(ref, sample.get("messages"), self.root)
        content = sample.get("content")
        if not isinstance(content, list) or not content:
            raise SampleError("empty", f"{ref}: needs a non-empty 'content' list")
        return self.builder.interleaved(ref, content, self.root)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict):
        self.epoch, self.offset = state["epoch"], state["offset"]
        self.stats = Counter(state["stats"])


class ListSource:
    """A finite, in-order source over ready-made documents (evaluation and tests)."""

    def __init__(self, docs: list[Document]):
        self.docs = docs
        self.stats: Counter = Counter()

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
        """Move the sub-sources' skip counts here, where the packer reports them."""
        for sub in self.sources:
            self.stats.update(sub.stats)
            sub.stats.clear()

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

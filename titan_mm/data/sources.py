"""Sample sources: JSONL files of captions, interleaved documents or conversations, sharded by rank
and worker.

A source yields ``(index, Document)``; bad samples are skipped and counted in ``stats`` by kind.
Its position (epoch, offset into this shard's order) is its whole state, so resume is exact.
"""

import json
import logging
import os
from collections import Counter

import torch
from torch.utils.data import get_worker_info

from titan_mm.data.documents import Document, DocumentBuilder, SampleError

logger = logging.getLogger(__name__)

MAX_SKIP_WARNINGS = 20


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
                self.stats[e.kind] += 1
                if sum(self.stats.values()) <= MAX_SKIP_WARNINGS:
                    logger.warning("skipping sample (%s): %s", e.kind, e)
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

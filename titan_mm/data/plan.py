"""Budgets from the data: the padding that a row layout (S tokens, the image slots) leaves on a
sample of the configured data, found by running the real packer over it.

The sample is read by a source of its own, so the training stream (and the RNG) never notice.
Its documents keep their token ids and patch coordinates but only one feature per patch: the
packer's decisions depend on counts, and rows of N x L x 1 features are cheap to build, so one
sample can be packed under many layouts (scripts/plan_batch.py).
"""

import dataclasses
import logging
import random
from collections import Counter
from dataclasses import dataclass

import torch

from titan_mm.config import Data
from titan_mm.data.dataloader import build_source, row_shape
from titan_mm.data.documents import Document
from titan_mm.data.image import VisionInputSpec
from titan_mm.data.packing import BestFitPacker, RowShape
from titan_mm.data.sources import skips_counted_only
from titan_mm.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PLAN_ROWS = 128
"""Rows packed per layout: enough for the open rows' start-up to wash out."""


def read_sample(cfg: Data, tokenizer: Tokenizer, spec: VisionInputSpec, *, seq_len: int, samples: int,
                seed: int) -> tuple[list[Document], Counter]:
    """The first ``samples`` documents data-parallel rank 0 would read (its own source object: the
    training stream's position and the RNG are untouched), each patch cut to one feature; and the
    source's counts of samples skipped on the way (missing media, malformed records...)."""
    small_buffer = dataclasses.replace(cfg, shuffle_buffer=min(cfg.shuffle_buffer, samples))
    docs = []
    with torch.random.fork_rng(devices=[]), skips_counted_only():
        source = build_source(small_buffer, tokenizer, spec, seq_len=seq_len, dp_rank=0, dp_world=1,
                              seed=seed)
        for _, doc in source:
            docs.append(dataclasses.replace(doc, images=[
                dataclasses.replace(img, patches=img.patches[:, :1].clone()) for img in doc.images]))
            if len(docs) == samples:
                break
    return docs, Counter(source.stats)


class CycledSample:
    """A packer source: the sample over and over, in a new seeded order each pass, ``passes``
    times; ``done`` turns true when it runs out (the packer then flushes its open rows, which a
    stream never does, so those rows are not counted)."""

    def __init__(self, docs: list[Document], passes: int, seed: int):
        self.docs, self.passes, self.seed = docs, passes, seed
        self.stats: Counter = Counter()
        self.skipped: list[str] = []
        self.done = False
        self.yielded = 0
        self.epoch = 0
        """Passes made (a packer source counts them)."""

    def __iter__(self):
        order = list(range(len(self.docs)))
        for p in range(self.passes):
            random.Random(f"{self.seed}/{p}").shuffle(order)
            for i in order:
                self.yielded += 1
                yield i, self.docs[i]
            self.epoch = p + 1
        self.done = True


@dataclass
class PackingEstimate:
    rows: int
    """Rows packed (those of the stream, not the final flush)."""
    token_padding: float
    """Share of the B x S token slots that are padding."""
    patch_padding: float
    """Share of the image patch slots that are padding (the vision encoder computes them too)."""
    documents_per_row: float
    images_per_row: float
    overlong: float
    """Share of the sample's documents that fit no row (skipped as overlong)."""


def estimate_packing(docs: list[Document], shape: RowShape, open_bins: int, rows: int = PLAN_ROWS,
                     seed: int = 0) -> PackingEstimate:
    """Pack the sample (cycled) into ``rows`` rows of ``shape`` with the trainer's packer."""
    tokens = max(1, sum(len(d.tokens) for d in docs))
    # each row holds at most S tokens: these passes give at least `rows` rows, plus the open ones
    passes = -(-(rows + open_bins) * shape.seq_len // tokens) + 1
    source = CycledSample(docs, passes, seed)
    packer = BestFitPacker(source, dataclasses.replace(shape, patch_dim=1), open_bins)
    totals = Counter()
    with skips_counted_only():
        for row in packer:
            if source.done:  # a flushed row: only its skip counts (made since the last row) are real
                totals["overlong"] += row["stats"].get("overlong", 0)
                break
            if totals["rows"] == rows:
                break
            totals.update(row["stats"])
    n = max(1, totals["rows"])
    overlong = totals["overlong"] + packer.stats["overlong"]  # the latter: since the last row
    return PackingEstimate(
        rows=totals["rows"], token_padding=totals["pad_tokens"] / (n * shape.seq_len),
        patch_padding=totals["pad_patches"] / max(1, totals["patch_slots"]),
        documents_per_row=totals["documents"] / n, images_per_row=totals["images"] / n,
        overlong=overlong / max(1, source.yielded))


def log_expected_padding(cfg: Data, tokenizer: Tokenizer, spec: VisionInputSpec, *, seq_len: int,
                         seed: int):
    """One log line: the padding the configured budgets give on data.plan_samples samples."""
    docs, skipped = read_sample(cfg, tokenizer, spec, seq_len=seq_len, samples=cfg.plan_samples, seed=seed)
    if not docs:
        logger.warning("padding estimate: none of the first samples could be read (%s)", dict(skipped))
        return
    est = estimate_packing(docs, row_shape(cfg, tokenizer, spec, seq_len), cfg.pack_open_bins, seed=seed)
    logger.info("expected padding on %d samples (data.plan_samples): tokens %.1f%%, image patch slots %.1f%%, "
                "%.1f documents and %.1f images per row, %.1f%% of documents too long for a row%s; "
                "scripts/plan_batch.py compares budgets", len(docs), 100 * est.token_padding,
                100 * est.patch_padding, est.documents_per_row, est.images_per_row, 100 * est.overlong,
                f", skipped while reading {dict(skipped)}" if skipped else "")

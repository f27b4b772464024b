"""Best-fit packing of documents into fixed-shape rows of S tokens and N images of L patches.

Each emitted row is a dict of tensors: input_ids, labels, document_ids, image_token_index [S];
position_ids [S] (or [P, S] for multi-axis rotary such as M-RoPE); pixel_values [N, L, D];
grid_thw [N, L, 3] (padding rows -1); plus ``stats``, counts to log (pad tokens, skipped samples
by reason), and ``skipped``, the references of the latest samples skipped since the last row.
"""

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from titan_mm.data.documents import DataError, Document, SampleError
from titan_mm.data.sources import MAX_SKIPS_REPORTED, count_skip

IGNORE_INDEX = -100
SIZE_STATS = ("pad_tokens", "pad_patches", "patch_slots", "rows", "documents")
"""Row ``stats`` keys that count sizes; every other key counts skipped samples by reason."""


@dataclass
class Bin:
    refs: list = field(default_factory=list)
    docs: list[Document] = field(default_factory=list)
    n_tokens: int = 0
    n_images: int = 0

    def add(self, ref, doc: Document):
        self.refs.append(ref)
        self.docs.append(doc)
        self.n_tokens += len(doc.tokens)
        self.n_images += len(doc.images)


@dataclass
class RowShape:
    seq_len: int
    """S: tokens per row."""
    max_images: int
    """N: image slots per row."""
    max_patches: int
    """L: patch slots per image."""
    patch_dim: int
    """D: features per patch."""
    merge_area: int
    """Patches per image token (m * m)."""
    pad_id: int
    media_token_ids: tuple[int, ...]
    """Placeholder ids that take a media embedding (image pad, video pad)."""
    position_dims: int = 1
    """P: rows of position ids per token (1 = plain RoPE, 3 = M-RoPE)."""


class BestFitPacker(IterableDataset, Stateful):
    """Keeps up to ``open_bins`` partly filled rows; each document goes to the open row it fills
    most tightly (token and image budgets both respected). When none has room, the fullest row is
    emitted. Open rows are saved as sample references, so a resumed run rebuilds them exactly."""

    def __init__(self, source, shape: RowShape, open_bins: int):
        self.source, self.shape, self.max_open = source, shape, open_bins
        self.bins: list[Bin] = []
        self.stats: Counter = Counter()
        self.skipped: list[str] = []

    def __iter__(self):
        # the source's pass during which a document last went into a row (as if the current one)
        placed_in_pass = self.source.epoch
        for ref, doc in self.source:
            if self._check_fits_a_row(doc):
                placed_in_pass = self.source.epoch
                row = self._place(ref, doc)
                if row is not None:
                    yield row
            elif self.source.epoch > placed_in_pass + 1:
                raise self._nothing_fits()
        while self.bins:  # a finite source: flush what is left, fullest first
            yield self._emit(max(self.bins, key=lambda b: b.n_tokens))

    def _nothing_fits(self) -> DataError:
        """A whole pass over the source put no document into a row: the skips would go on forever."""
        s = self.shape
        return DataError(
            f"no sample fits a row: a full pass over the data skipped every document ({dict(self.stats)}; "
            f"e.g. {self.skipped[-1] if self.skipped else '-'}). Rows hold training.seq_len={s.seq_len} tokens "
            f"and data.max_images_per_row={s.max_images} images of data.max_patches_per_image={s.max_patches} "
            f"patches: raise those to fit the data")

    def _check_fits_a_row(self, doc: Document) -> bool:
        s = self.shape
        reason = None
        if len(doc.tokens) > s.seq_len:
            reason = f"{len(doc.tokens)} tokens > training.seq_len={s.seq_len}"
        elif len(doc.images) > s.max_images:
            reason = f"{len(doc.images)} images > data.max_images_per_row={s.max_images}"
        elif any(img.patches.shape[0] > s.max_patches for img in doc.images):
            reason = f"an image has more than data.max_patches_per_image={s.max_patches} patches"
        if reason is None:
            return True
        count_skip(self, SampleError("overlong", f"{doc.ref}: {reason}"))
        return False

    def _place(self, ref, doc: Document) -> dict | None:
        n_tok, n_img = len(doc.tokens), len(doc.images)
        fits = [b for b in self.bins if b.n_tokens + n_tok <= self.shape.seq_len
                and b.n_images + n_img <= self.shape.max_images]
        if fits:
            max(fits, key=lambda b: b.n_tokens).add(ref, doc)
            return None
        row = None
        if len(self.bins) >= self.max_open:
            row = self._emit(max(self.bins, key=lambda b: b.n_tokens))
        new_bin = Bin()
        new_bin.add(ref, doc)
        self.bins.append(new_bin)
        return row

    def _emit(self, b: Bin) -> dict:
        self.bins.remove(b)
        row = build_row(b.docs, self.shape)
        stats = self.stats + self.source.stats
        self.stats.clear()
        self.source.stats.clear()
        stats.update(row["stats"])
        stats["rows"] += 1
        stats["documents"] += len(b.docs)
        row["stats"] = dict(stats)
        row["skipped"] = (self.source.skipped + self.skipped)[-MAX_SKIPS_REPORTED:]
        self.source.skipped, self.skipped = [], []
        return row

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "bins": [list(b.refs) for b in self.bins],
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict):
        self.source.load_state_dict(state["source"])
        self.stats = Counter(state["stats"])
        self.bins = []
        for refs in state["bins"]:
            b = Bin()
            for ref in refs:
                b.add(ref, self.source.load(ref))
            self.bins.append(b)


def build_row(docs: list[Document], s: RowShape) -> dict:
    """Lay documents out in one row: positions restart and document ids change per document;
    labels are next tokens inside a document (IGNORE_INDEX where not a target)."""
    S, N, L, Lm = s.seq_len, s.max_images, s.max_patches, s.max_patches // s.merge_area
    row = {
        "input_ids": torch.full((S,), s.pad_id, dtype=torch.long),
        "labels": torch.full((S,), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros(s.position_dims, S, dtype=torch.long),
        "document_ids": torch.full((S,), -1, dtype=torch.long),
        "image_token_index": torch.full((S,), -1, dtype=torch.long),
        "pixel_values": torch.zeros(N, L, s.patch_dim),
        "grid_thw": torch.full((N, L, 3), -1, dtype=torch.long),
    }
    start, slot = 0, 0
    for doc_id, doc in enumerate(docs):
        tokens = torch.tensor(doc.tokens)
        targets = torch.tensor(doc.targets)
        n = len(tokens)
        end = start + n
        row["input_ids"][start:end] = tokens
        row["labels"][start:end - 1] = torch.where(targets[1:], tokens[1:], IGNORE_INDEX)
        row["position_ids"][:, start:end] = doc.positions if doc.positions is not None else torch.arange(n)
        row["document_ids"][start:end] = doc_id
        token_index = []
        for img in doc.images:
            n_patches = img.patches.shape[0]
            row["pixel_values"][slot, :n_patches] = img.patches
            row["grid_thw"][slot, :n_patches] = img.coords
            token_index.append(slot * Lm + torch.arange(n_patches // s.merge_area))
            slot += 1
        if token_index:
            image_positions = torch.isin(tokens, torch.tensor(s.media_token_ids)).nonzero()[:, 0]
            token_index = torch.cat(token_index)
            if len(image_positions) != len(token_index):
                raise ValueError(f"{doc.ref}: {len(image_positions)} image tokens but "
                                 f"{len(token_index)} image embeddings")
            row["image_token_index"][start + image_positions] = token_index
        start = end
    if s.position_dims == 1:
        row["position_ids"] = row["position_ids"][0]
    valid_patches = int((row["grid_thw"][..., 0] >= 0).sum())
    row["stats"] = {"pad_tokens": S - start, "pad_patches": N * L - valid_patches, "patch_slots": N * L}
    row["skipped"] = []  # the packer fills in the samples skipped before this row
    return row


"""Best-fit packing of documents into fixed-shape rows of S tokens and N patch slots of L patches.

Each emitted row is a dict of tensors: input_ids, labels, document_ids, image_token_index [S];
position_ids [S] (or [P, S] for multi-axis rotary such as M-RoPE); pixel_values [N, L, D];
grid_thw [N, L, 3] (padding rows -1); plus ``stats``, counts to log (pad tokens and patches,
skipped samples by reason), and ``skipped``, the references of the latest samples skipped since
the last row.

A slot holds the patches of several *visual items* one after another: an image is one item, a
video one item per temporal patch (every vision encoder here attends within one frame). Each item's
patches keep their (t, h, w) coordinates within the item, so an item starts at its (t, 0, 0) patch
and item ids need no tensor of their own (titan_mm.models.multimodal.visual_item_ids).
image_token_index points each image token at its merged patch: slot * L/m^2 + offset.
"""

import bisect
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from titan_mm.data.documents import DataError, Document, Image, SampleError
from titan_mm.data.sources import MAX_SKIPS_REPORTED, count_skip

IGNORE_INDEX = -100
SIZE_STATS = ("pad_tokens", "pad_patches", "patch_slots", "rows", "documents", "images")
"""Row ``stats`` keys that count sizes; every other key counts skipped samples by reason."""

Placement = list[tuple[int, int]]
"""(slot, first patch in the slot) of each visual item of a document, in document order."""


@dataclass
class RowShape:
    seq_len: int
    """S: tokens per row."""
    image_slots: int
    """N: patch slots per row, each holding the patches of one or more visual items."""
    patches_per_slot: int
    """L: patches per slot (an item never spans two slots)."""
    patch_dim: int
    """D: features per patch."""
    merge_area: int
    """Patches per image token (m * m)."""
    pad_id: int
    media_token_ids: tuple[int, ...]
    """Placeholder ids that take a media embedding (image pad, video pad)."""
    position_dims: int = 1
    """P: rows of position ids per token (1 = plain RoPE, 3 = M-RoPE)."""


def media_item_sizes(media: Image) -> list[int]:
    """Patches of each visual item of one image or video: an image is one item, a video one per
    temporal patch (its patches are ordered frame by frame)."""
    t, h, w = media.grid
    return [h * w] * t


def document_item_sizes(doc: Document) -> list[int]:
    """Patches of each visual item of ``doc``, in document order."""
    return [n for media in doc.images for n in media_item_sizes(media)]


class RowSlots:
    """The free patches of a row's N slots, as sorted (free, slot) pairs for best-fit lookups."""

    def __init__(self, n_slots: int, slot_patches: int):
        self.slot_patches = slot_patches
        self.free = [(slot_patches, slot) for slot in range(n_slots)]

    @property
    def largest_free(self) -> int:
        return self.free[-1][0]

    def place(self, sizes: list[int]) -> Placement | None:
        """Best fit decreasing: the largest item first, each into the slot with the least room that
        holds it (the lowest slot of equals). Takes the room and returns each item's (slot, offset)
        in the order of ``sizes``; None, taking nothing, when they do not all fit."""
        free = list(self.free)
        placement = [None] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            k = bisect.bisect_left(free, (sizes[i], -1))
            if k == len(free):
                return None
            room, slot = free.pop(k)
            placement[i] = (slot, self.slot_patches - room)
            bisect.insort(free, (room - sizes[i], slot))
        self.free = free
        return placement


@dataclass
class Bin:
    slots: RowSlots
    refs: list = field(default_factory=list)
    docs: list[Document] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)
    n_tokens: int = 0
    n_patches: int = 0

    def add(self, ref, doc: Document, placement: Placement, n_patches: int):
        """``placement``: where ``slots.place`` put the document's items."""
        self.refs.append(ref)
        self.docs.append(doc)
        self.placements.append(placement)
        self.n_tokens += len(doc.tokens)
        self.n_patches += n_patches


class BestFitPacker(IterableDataset, Stateful):
    """Keeps up to ``open_bins`` partly filled rows. Each document goes to the fullest open row
    (``_fill``) whose token budget S it fits and whose N slots of L patches can hold each of its
    visual items (``RowSlots.place``). When none can, the fullest row is emitted. Open rows are saved as sample references: a resumed run rebuilds
    them, slot placements included, exactly."""

    def __init__(self, source, shape: RowShape, open_bins: int):
        self.source, self.shape, self.max_open = source, shape, open_bins
        self.bins: list[Bin] = []
        self.stats: Counter = Counter()
        self.skipped: list[str] = []

    def __iter__(self):
        # the source's pass during which a document last went into a row (as if the current one)
        placed_in_pass = self.source.epoch
        for ref, doc in self.source:
            sizes = document_item_sizes(doc)
            if self._check_fits_a_row(doc, sizes):
                placed_in_pass = self.source.epoch
                row = self._place(ref, doc, sizes)
                if row is not None:
                    yield row
            elif self.source.epoch > placed_in_pass + 1:
                raise self._nothing_fits()
        while self.bins:  # a finite source: flush what is left, fullest first
            yield self._emit(max(self.bins, key=self._fill))

    def _nothing_fits(self) -> DataError:
        """A whole pass over the source put no document into a row: the skips would go on forever."""
        s = self.shape
        return DataError(
            f"no sample fits a row: a full pass over the data skipped every document ({dict(self.stats)}; "
            f"e.g. {self.skipped[-1] if self.skipped else '-'}). Rows hold training.seq_len={s.seq_len} tokens "
            f"and data.image_slots_per_row={s.image_slots} slots of data.patches_per_slot={s.patches_per_slot} "
            f"patches: raise those to fit the data")

    def _fill(self, b: Bin) -> float:
        """How full a row is in its fuller budget: best fit in whichever of tokens and patches
        binds (on generated caption, chat and caption + text mixes this closed fewer rows than
        sums or distances of the two shares)."""
        s = self.shape
        return max(b.n_tokens / s.seq_len, b.n_patches / (s.image_slots * s.patches_per_slot))

    def _new_bin(self) -> Bin:
        return Bin(RowSlots(self.shape.image_slots, self.shape.patches_per_slot))

    def _check_fits_a_row(self, doc: Document, sizes: list[int]) -> bool:
        s = self.shape
        reason = None
        if len(doc.tokens) > s.seq_len:
            reason = f"{len(doc.tokens)} tokens > training.seq_len={s.seq_len}"
        elif max(sizes, default=0) > s.patches_per_slot:
            reason = (f"an image (or video frame) of {max(sizes)} patches > "
                      f"data.patches_per_slot={s.patches_per_slot}")
        elif self._new_bin().slots.place(sizes) is None:
            reason = (f"its {len(sizes)} images and video frames ({sum(sizes)} patches) do not fit "
                      f"data.image_slots_per_row={s.image_slots} slots of {s.patches_per_slot} patches")
        if reason is None:
            return True
        count_skip(self, SampleError("overlong", f"{doc.ref}: {reason}"))
        return False

    def _place(self, ref, doc: Document, sizes: list[int]) -> dict | None:
        s = self.shape
        n_tok, n_patches, largest = len(doc.tokens), sum(sizes), max(sizes, default=0)
        # totals and the largest item are checked for every open row; the slot assignment only
        # for the best of them (for a document of one item the checks already decide it)
        fits = [b for b in self.bins if b.n_tokens + n_tok <= s.seq_len
                and b.n_patches + n_patches <= s.image_slots * s.patches_per_slot
                and b.slots.largest_free >= largest]
        while fits:
            best = max(fits, key=self._fill)
            placement = best.slots.place(sizes)
            if placement is not None:
                best.add(ref, doc, placement, n_patches)
                return None
            fits.remove(best)
        row = None
        if len(self.bins) >= self.max_open:
            row = self._emit(max(self.bins, key=self._fill))
        new_bin = self._new_bin()
        new_bin.add(ref, doc, new_bin.slots.place(sizes), n_patches)
        self.bins.append(new_bin)
        return row

    def _emit(self, b: Bin) -> dict:
        self.bins.remove(b)
        row = build_row(b.docs, self.shape, b.placements)
        stats = self.stats + self.source.stats
        self.stats.clear()
        self.source.stats.clear()
        stats.update(row["stats"])
        stats["rows"] += 1
        stats["documents"] += len(b.docs)
        stats["images"] += sum(len(doc.images) for doc in b.docs)  # and videos
        row["stats"] = dict(stats)
        row["refs"] = list(b.refs)  # document i of the row (document id i): for per-sample scores
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
            # placing the same documents in the same order gives the same slots
            b = self._new_bin()
            for ref in refs:
                doc = self.source.load(ref)
                sizes = document_item_sizes(doc)
                b.add(ref, doc, b.slots.place(sizes), sum(sizes))
            self.bins.append(b)


def one_medium_per_slot(docs: list[Document], n_slots: int) -> list[Placement]:
    """Each image or video of the row in a slot of its own, in order, a video's frames one after
    another (the layout of tests and of the synthetic benchmark; the packer fills slots instead)."""
    placements, slot = [], 0
    for doc in docs:
        placement = []
        for media in doc.images:
            offset = 0
            for size in media_item_sizes(media):
                placement.append((slot, offset))
                offset += size
            slot += 1
        placements.append(placement)
    if slot > n_slots:
        raise ValueError(f"{slot} images and videos but {n_slots} slots a row; give build_row the "
                         f"placements of BestFitPacker, which shares slots")
    return placements


def build_row(docs: list[Document], s: RowShape, placements: list[Placement] | None = None) -> dict:
    """Lay documents out in one row: positions restart and document ids change per document;
    labels are next tokens inside a document (IGNORE_INDEX where not a target). ``placements``:
    each document's items' (slot, offset), as the packer chose them; None = one_medium_per_slot."""
    S, N, L, Lm = s.seq_len, s.image_slots, s.patches_per_slot, s.patches_per_slot // s.merge_area
    if placements is None:
        placements = one_medium_per_slot(docs, N)
    row = {
        "input_ids": torch.full((S,), s.pad_id, dtype=torch.long),
        "labels": torch.full((S,), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros(s.position_dims, S, dtype=torch.long),
        "document_ids": torch.full((S,), -1, dtype=torch.long),
        "image_token_index": torch.full((S,), -1, dtype=torch.long),
        "pixel_values": torch.zeros(N, L, s.patch_dim),
        "grid_thw": torch.full((N, L, 3), -1, dtype=torch.long),
    }
    start, valid_patches = 0, 0
    for doc_id, (doc, placement) in enumerate(zip(docs, placements)):
        tokens = torch.tensor(doc.tokens)
        targets = torch.tensor(doc.targets)
        n = len(tokens)
        end = start + n
        row["input_ids"][start:end] = tokens
        row["labels"][start:end - 1] = torch.where(targets[1:], tokens[1:], IGNORE_INDEX)
        row["position_ids"][:, start:end] = doc.positions if doc.positions is not None else torch.arange(n)
        row["document_ids"][start:end] = doc_id
        token_index = []
        items = iter(placement)
        for media in doc.images:
            first = 0
            for size in media_item_sizes(media):
                slot, offset = next(items)
                row["pixel_values"][slot, offset:offset + size] = media.patches[first:first + size]
                row["grid_thw"][slot, offset:offset + size] = media.coords[first:first + size]
                token_index.append(slot * Lm + offset // s.merge_area + torch.arange(size // s.merge_area))
                first += size
                valid_patches += size
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
    row["stats"] = {"pad_tokens": S - start, "pad_patches": N * L - valid_patches, "patch_slots": N * L}
    row["skipped"] = []  # the packer fills in the samples skipped before this row
    return row

"""Turn raw samples into documents: token ids, which tokens are trained on, and image patches."""

from dataclasses import dataclass, field

import torch

from titan_mm.data.image import ImageProcessor, MediaError, load_image
from titan_mm.data.tokenizer import Tokenizer


class SampleError(Exception):
    """A sample that cannot be turned into a document; it is skipped and counted under ``kind``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Image:
    """One image or video, cut into patches; videos have several temporal patches (t > 0)."""

    patches: torch.Tensor
    """[n_patches, D] flattened patches in merge-block order."""
    coords: torch.Tensor
    """[n_patches, 3] (t, h, w) grid position of each patch."""
    is_video: bool = False
    seconds_per_temporal_patch: float = 0.0
    """Videos: seconds between consecutive temporal patches (for time-aware position ids)."""

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) patch-grid size."""
        t, h, w = (self.coords.amax(dim=0) + 1).tolist()
        return t, h, w


@dataclass
class Document:
    ref: str
    """Where the sample came from (file and id), for logs."""
    tokens: list[int] = field(default_factory=list)
    targets: list[bool] = field(default_factory=list)
    """targets[i]: token i is predicted by the model (it is part of a supervised span)."""
    images: list[Image] = field(default_factory=list)
    positions: torch.Tensor | None = None
    """[P, n] position ids when the model needs more than 0..n-1 (M-RoPE); set by the builder."""


class DocumentBuilder:
    """Builds documents ``<bos> ... <eos>`` where every image becomes
    ``<image_start> <image_pad> * n <image_end>`` with n = its merged patch count."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor):
        self.tok = tokenizer
        self.image_processor = image_processor
        self.merge_area = image_processor.merge_size ** 2

    def caption(self, ref: str, image_path: str, caption: str) -> Document:
        doc = self._start(ref)
        self._add_image(doc, image_path)
        self._add_text(doc, caption, supervised=True)
        return self._finish(doc)

    def interleaved(self, ref: str, content: list[dict], image_root: str) -> Document:
        doc = self._start(ref)
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                self._add_text(doc, part["text"], supervised=True)
            elif kind == "image" and isinstance(part.get("image"), str):
                self._add_image(doc, f"{image_root}/{part['image']}")
            else:
                raise SampleError("malformed", f"{ref}: content part {part!r} is not text or image")
        if not any(doc.targets):
            raise SampleError("empty", f"{ref}: no text to train on")
        return self._finish(doc)

    def _start(self, ref: str) -> Document:
        return Document(ref=ref, tokens=[self.tok.bos_id], targets=[False])

    def _finish(self, doc: Document) -> Document:
        doc.tokens.append(self.tok.eos_id)
        doc.targets.append(True)
        return doc

    def _add_text(self, doc: Document, text: str, supervised: bool):
        ids = self.tok.encode(text)
        doc.tokens += ids
        doc.targets += [supervised] * len(ids)

    def _add_image(self, doc: Document, path: str):
        try:
            patches, coords = self.image_processor(load_image(path))
        except MediaError as e:
            raise SampleError(e.kind, f"{doc.ref}: {e}") from None
        n = patches.shape[0] // self.merge_area
        doc.tokens += [self.tok.image_start_id] + [self.tok.image_id] * n + [self.tok.image_end_id]
        doc.targets += [False] * (n + 2)
        doc.images.append(Image(patches, coords))

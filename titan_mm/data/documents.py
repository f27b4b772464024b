"""Turn raw samples into documents: token ids, which tokens are trained on, and image patches."""

import io
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import torch

from titan_mm.data.image import ImageProcessor, MediaError, load_image, to_uint8
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.data.video import load_video, video_frame_processor


class DataError(ValueError):
    """The data cannot make a batch at all (every sample of a full pass skipped, an empty shard): the
    run stops with this message (exit code 2) instead of waiting forever."""


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
    frame_seconds: tuple[float, ...] = ()
    """Videos: the time of each sampled frame (an odd count's repeated last frame not included),
    for timestamps in the text (Qwen3-VL)."""
    first_token: int = -1
    """Index of its first placeholder token in its document (set by the builder)."""

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) patch-grid size."""
        t, h, w = (self.coords.amax(dim=0) + 1).tolist()
        return t, h, w


def video_image(patches: torch.Tensor, coords: torch.Tensor, frame_seconds: list[float],
                temporal_patch_size: int) -> Image:
    """A video's Image: its sampled frames' times, and temporal patches spaced by the mean gap
    between frames (0 for a single frame, where there is one temporal patch)."""
    n = len(frame_seconds)
    gap = (frame_seconds[-1] - frame_seconds[0]) / (n - 1) if n > 1 else 0.0
    return Image(patches, coords, is_video=True, seconds_per_temporal_patch=gap * temporal_patch_size,
                 frame_seconds=tuple(frame_seconds))


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
    ``<image_start> <image_pad> * n <image_end>`` with n = its merged patch count (videos use
    ``<video_pad>``). ``positions_fn(doc)``, when given, sets each document's position ids.
    Video files are sampled at ``video_fps`` frames a second, at most ``video_max_frames``."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor,
                 positions_fn: Callable[[Document], torch.Tensor] | None = None, *,
                 video_fps: float = 2.0, video_max_frames: int = 16):
        self.tok = tokenizer
        self.image_processor = image_processor
        self.merge_area = image_processor.merge_size ** 2
        self.positions_fn = positions_fn
        self.video_fps, self.video_max_frames = video_fps, video_max_frames
        self.video_processor = video_frame_processor(image_processor, video_max_frames)

    def caption(self, ref: str, image_path: str | BinaryIO, caption: str) -> Document:
        doc = self._start(ref)
        self._add_image(doc, image_path)
        self._add_text(doc, caption, supervised=True)
        return self._finish(doc)

    def text_chunks(self, ref: str, text: str, max_tokens: int) -> list[Document]:
        """Plain text ``<bos> text <eos>``, all trained on, cut into documents of at most
        ``max_tokens`` tokens so that a long text is trained on whole (each chunk is packed as its
        own document: positions restart and its first token has no label)."""
        if not text.strip():
            raise SampleError("empty", f"{ref}: no text")
        doc = self._start(ref)
        self._add_text(doc, text, supervised=True)
        doc.tokens.append(self.tok.eos_id)
        doc.targets.append(True)
        n = -(-len(doc.tokens) // max_tokens)
        chunks = []
        for i in range(n):
            part = slice(i * max_tokens, (i + 1) * max_tokens)
            chunk = Document(ref=ref if n == 1 else f"{ref} chunk {i + 1}/{n}", tokens=doc.tokens[part],
                             targets=doc.targets[part])
            if self.positions_fn is not None:
                chunk.positions = self.positions_fn(chunk)
            chunks.append(chunk)
        return chunks

    def interleaved(self, ref: str, content: list[dict], image_root: str) -> Document:
        doc = self._add_content(self._start(ref), content, image_root)
        if not any(doc.targets):
            raise SampleError("empty", f"{ref}: no text to train on")
        return self._finish(doc)

    def prompt(self, ref: str, content: list[dict], image_root: str) -> Document:
        """A prompt to continue (generation): ``<bos>`` and the interleaved ``content`` (parts as
        in ``interleaved``), with no ``<eos>``."""
        doc = self._add_content(self._start(ref), content, image_root)
        if self.positions_fn is not None:
            doc.positions = self.positions_fn(doc)
        return doc

    def _add_content(self, doc: Document, content: list[dict], image_root: str) -> Document:
        ref = doc.ref
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                self._add_text(doc, part["text"], supervised=True)
            elif kind == "image" and is_image_value(part.get("image")):
                self._add_image(doc, image_input(part["image"], image_root))
            elif kind == "video" and _is_frame_list(part.get("video")) and _is_positive(part.get("fps")):
                self._add_video(doc, [f"{image_root}/{f}" for f in part["video"]], part["fps"])
            elif kind == "video" and isinstance(part.get("video"), str):
                self._add_video_file(doc, f"{image_root}/{part['video']}")
            else:
                raise SampleError("malformed", f"{ref}: content part {part!r} is not text, image or "
                                               f"video (a video file, or a list of frame files and "
                                               f"their fps)")
        return doc

    def _start(self, ref: str) -> Document:
        bos = [self.tok.bos_id] if self.tok.bos_id is not None else []
        return Document(ref=ref, tokens=bos, targets=[False] * len(bos))

    def _finish(self, doc: Document) -> Document:
        doc.tokens.append(self.tok.eos_id)
        doc.targets.append(True)
        if self.positions_fn is not None:
            doc.positions = self.positions_fn(doc)
        return doc

    def _add_text(self, doc: Document, text: str, supervised: bool):
        ids = self.tok.encode(text)
        doc.tokens += ids
        doc.targets += [supervised] * len(ids)

    def _add_image(self, doc: Document, path: str | BinaryIO):
        try:
            patches, coords = self.image_processor(load_image(path))
        except MediaError as e:
            raise SampleError(e.kind, f"{doc.ref}: {e}") from None
        self._add_media(doc, Image(patches, coords), self.tok.image_id)

    def _add_video(self, doc: Document, frame_paths: list[str], fps: float):
        """A video given as its sampled frames (image files of one size), ``fps`` frames a second."""
        if self.tok.video_id is None:
            raise SampleError("unsupported", f"{doc.ref}: a video sample, but the tokenizer defines "
                                             f"no video_token")
        try:
            frames = [to_uint8(load_image(path)) for path in frame_paths]
            if any(f.shape != frames[0].shape for f in frames):
                raise MediaError("corrupt_video", f"frames of {frame_paths[0]}... differ in size")
            patches, coords = self.image_processor.video(torch.stack(frames))
        except MediaError as e:
            raise SampleError(e.kind, f"{doc.ref}: {e}") from None
        frame_seconds = [i / fps for i in range(len(frames))]
        self._add_media(doc, video_image(patches, coords, frame_seconds, self.image_processor.temporal_patch_size),
                        self.tok.video_id)

    def _add_video_file(self, doc: Document, path: str):
        self._add_decoded_video(doc, path, load_video)

    def _add_decoded_video(self, doc: Document, path: str, decode: Callable):
        """A video file, sampled and decoded here (in the loader worker) by
        ``decode(path, fps, max_frames) -> (frames [T, 3, H, W], the time of each sampled frame)``."""
        if self.tok.video_id is None:
            raise SampleError("unsupported", f"{doc.ref}: a video, but the tokenizer defines no video_token")
        try:
            frames, frame_seconds = decode(path, self.video_fps, self.video_max_frames)
            patches, coords = self.video_processor.video(frames)
        except MediaError as e:
            raise SampleError(e.kind, f"{doc.ref}: {e}") from None
        video = video_image(patches, coords, frame_seconds, self.image_processor.temporal_patch_size)
        self._add_media(doc, video, self.tok.video_id)

    def _add_media(self, doc: Document, media: Image, placeholder_id: int):
        layout = self.image_processor.video_layout if media.is_video else None
        if layout is not None:
            tokens = layout(self.tok, media)
        else:
            n = media.patches.shape[0] // self.merge_area
            tokens = [self.tok.image_start_id] + [placeholder_id] * n + [self.tok.image_end_id]
        media.first_token = len(doc.tokens) + tokens.index(placeholder_id)
        doc.tokens += tokens
        doc.targets += [False] * len(tokens)
        doc.images.append(media)


def is_image_value(value) -> bool:
    """An image as a sample may give it: a path, encoded bytes, or a {"bytes", "path"} struct (the
    HF datasets Image feature as Parquet stores it)."""
    if isinstance(value, dict):
        return is_image_value(value.get("bytes")) or is_image_value(value.get("path"))
    return isinstance(value, (str, bytes)) and len(value) > 0


def image_input(value, root: str) -> str | BinaryIO:
    """What load_image opens for an image value (see is_image_value): bytes are preferred over a
    path; paths are relative to ``root``, the data file's folder."""
    if isinstance(value, dict):
        value = value["bytes"] if is_image_value(value.get("bytes")) else value["path"]
    if isinstance(value, bytes):
        return io.BytesIO(value)
    return os.path.join(root, value)


def _is_frame_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(f, str) for f in value)


def _is_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0

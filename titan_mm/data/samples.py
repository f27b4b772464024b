"""Records -> documents for each sample kind (data.dataset), whatever file format they came from.

A record is a JSONL line (bytes, parsed here so that a bad line is one skipped sample), a parsed
JSON array element, a Parquet row (a dict of its columns) or a paragraph of a .txt file. Fields:

- captions: ``image`` (path, bytes or {"bytes", "path"} struct) and ``caption``;
- interleaved: ``content`` (a list of text / image / video parts), or OBELICS' parallel ``texts``
  and ``images`` lists (exactly one of each pair set);
- chat: ``messages`` (a list, or a JSON string of one, as Parquet often stores it) and optionally
  ``images``, taken by bare ``{"type": "image"}`` parts (titan_mm/data/chat.py);
- text: ``text`` (or the record itself, from a .txt file); cut into seq_len chunks, never skipped
  for its length.

Media paths are relative to the data file's folder. ``id`` (optional) is named in skip reports.
"""

import json

from titan_mm.data.documents import Document, DocumentBuilder, SampleError, image_input, is_image_value


class SampleDecoder:
    def __init__(self, kind: str, builder: DocumentBuilder, max_tokens: int):
        self.kind, self.builder, self.max_tokens = kind, builder, max_tokens

    def __call__(self, ref: str, record, root: str) -> list[Document]:
        """The record's documents (several only for long texts), or SampleError."""
        if self.kind == "text" and isinstance(record, str):
            return self.builder.text_chunks(ref, record, self.max_tokens)
        sample = parse(ref, record)
        if not isinstance(sample, dict):
            raise SampleError("malformed", f"{ref}: a sample must be a JSON object")
        ref = f"{ref} ({sample['id']})" if sample.get("id") is not None else ref
        try:
            return self._documents(ref, sample, root)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            # a field of an unexpected type deep inside a sample: skip it rather than stop training
            raise SampleError("malformed", f"{ref}: {type(e).__name__}: {e}") from None

    def _documents(self, ref: str, sample: dict, root: str) -> list[Document]:
        if self.kind == "text":
            text = sample.get("text")
            if not isinstance(text, str):
                raise SampleError("malformed", f"{ref}: needs a string field 'text'")
            return self.builder.text_chunks(ref, text, self.max_tokens)
        if self.kind == "captions":
            image, caption = sample.get("image"), sample.get("caption")
            if image is None or not isinstance(caption, str) or not caption.strip():
                raise SampleError("malformed", f"{ref}: needs fields 'image' and 'caption' (a string)")
            return [self.builder.caption(ref, image_or_error(ref, image, root), caption)]
        if self.kind == "chat":
            messages = sample.get("messages")
            if isinstance(messages, str):
                messages = parse(ref, messages)
            return [self.builder.chat(ref, messages, root, sample.get("images"))]
        content = sample.get("content")
        if content is None and "texts" in sample:
            content = obelics_content(ref, sample.get("texts"), sample.get("images"))
        if not isinstance(content, list) or not content:
            raise SampleError("empty", f"{ref}: needs a non-empty 'content' list (or 'texts' and 'images')")
        return [self.builder.interleaved(ref, content, root)]


def parse(ref: str, record):
    """A JSONL line or a JSON string parsed; an already parsed record (JSON element, Parquet row) as is."""
    if not isinstance(record, (bytes, str)):
        return record
    try:
        return json.loads(record)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError("malformed", f"{ref}: invalid JSON ({e})") from None


def obelics_content(ref: str, texts, images) -> list[dict]:
    """OBELICS' parallel lists -> interleaved content parts (position i is a text or an image)."""
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise SampleError("malformed", f"{ref}: 'texts' and 'images' must be lists of one length")
    content = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise SampleError("malformed", f"{ref}: position {i} must have a text or an image, not "
                                           f"{'both' if text is not None else 'neither'}")
        content.append({"type": "text", "text": text} if text is not None else {"type": "image", "image": image})
    return content


def image_or_error(ref: str, image, root: str):
    if not is_image_value(image):
        raise SampleError("malformed", f"{ref}: image {str(image)[:80]!r} is not a path, bytes or "
                                       f"{{bytes, path}} struct")
    return image_input(image, root)

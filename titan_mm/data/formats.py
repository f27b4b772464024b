"""Record files: how a source streams raw samples out of a file, chosen by the file's extension.

A file is walked as *units* (the whole file, or one Parquet row group) of *records*:

| extension | unit      | record                                        | position (two ints)        |
|-----------|-----------|-----------------------------------------------|----------------------------|
| .jsonl    | file      | a non-blank line (bytes, parsed later)        | byte offset, line number   |
| .json     | file      | an element of the top-level array (parsed)    | byte offset, element index |
| .parquet  | row group | a row, as a dict of its columns               | row group, row in group    |
| .txt      | file      | a blank-line separated paragraph, or the file | byte offset, line number   |

``records(unit, start)`` yields ``(position, next_start, record)`` from ``start`` (None = the start of
the unit); ``next_start`` resumes right after that record, so a reader's place is exact. ``read(position)``
reads one record again, alone (to rebuild packed rows and shuffle buffers on resume). Nothing reads
a whole file up front: JSON arrays are decoded element by element, Parquet row group by row group.

A file that cannot be read on (a JSON syntax error, a corrupt Parquet file) raises SampleError from
``records``: the source counts it and moves to the next unit.
"""

import codecs
import json
import os

from titan_mm.config import ConfigError
from titan_mm.data.documents import SampleError

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt", ".tar": "tar"}

# Parquet columns a kind reads (the others, e.g. OBELICS' metadata, are never decoded)
PARQUET_COLUMNS = {
    "captions": ("id", "image", "caption"),
    "interleaved": ("id", "content", "texts", "images"),
    "chat": ("id", "messages", "images"),
    "text": ("id", "text"),
}


def record_format(path: str, kind: str) -> str:
    """The format of ``path`` (a file or a glob) from its extension; ConfigError if it cannot hold
    samples of ``kind`` (a data.dataset value)."""
    ext = os.path.splitext(path)[1].lower()
    fmt = EXTENSIONS.get(ext)
    if fmt is None:
        raise ConfigError(f"data file {path!r}: unknown extension {ext or '(none)'!r}; use one of "
                          f"{sorted(EXTENSIONS)} (for a glob, end it with the extension: '/data/*.jsonl')")
    if (fmt == "tar") != (kind == "webdataset"):
        raise ConfigError(f"data file {path!r}: .tar shards are read with data.dataset = 'webdataset', "
                          f"and webdataset reads .tar shards only (got dataset {kind!r})")
    if fmt == "txt" and kind != "text":
        raise ConfigError(f"data file {path!r}: .txt files hold plain text; set data.dataset = 'text'")
    if fmt == "parquet":
        import_parquet(path)
    return fmt


def import_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading {path} needs pyarrow: pip install 'titan_mm[parquet]'") from None
    return pq


def open_record_file(path: str, kind: str, text_split: str = "paragraph"):
    fmt = record_format(path, kind)
    if fmt == "jsonl":
        return JsonlFile(path)
    if fmt == "json":
        return JsonArrayFile(path)
    if fmt == "parquet":
        return ParquetFile(path, PARQUET_COLUMNS[kind])
    return TextFile(path, whole_file=text_split == "file")


class JsonlFile:
    """One JSON object a line; parsing happens later, per record, so that a bad line is one skip."""

    def __init__(self, path: str):
        self.path = path

    def units(self) -> list[int]:
        return [0]

    def records(self, unit: int, start: tuple[int, int] | None):
        offset, line = start or (0, 0)
        with open(self.path, "rb") as f:
            f.seek(offset)
            for raw in f:
                line += 1
                position = (offset, line)
                offset += len(raw)
                if raw.strip():
                    yield position, (offset, line), raw

    def read(self, position: tuple[int, int]) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(position[0])
            return f.readline()

    def describe(self, position: tuple[int, int]) -> str:
        return f"{self.path}:{position[1]}"


class TextFile:
    """Plain text: each blank-line separated paragraph is a record, or (whole_file) the file is one."""

    def __init__(self, path: str, whole_file: bool):
        self.path, self.whole_file = path, whole_file

    def units(self) -> list[int]:
        return [0]

    def records(self, unit: int, start: tuple[int, int] | None):
        if self.whole_file:
            if start is None:
                yield (0, 1), (os.path.getsize(self.path), 0), self.read((0, 1))
            return
        offset, line = start or (0, 0)
        lines, first = [], None
        with open(self.path, "rb") as f:
            f.seek(offset)
            for raw in f:
                line += 1
                offset += len(raw)
                if raw.strip():
                    first = first or (offset - len(raw), line)
                    lines.append(raw)
                elif lines:
                    yield first, (offset, line), _text(lines)
                    lines, first = [], None
        if lines:
            yield first, (offset, line), _text(lines)

    def read(self, position: tuple[int, int]) -> str:
        with open(self.path, "rb") as f:
            if self.whole_file:
                return _text([f.read()])
            f.seek(position[0])
            lines = []
            for raw in f:
                if not raw.strip():
                    break
                lines.append(raw)
            return _text(lines)

    def describe(self, position: tuple[int, int]) -> str:
        return self.path if self.whole_file else f"{self.path}:{position[1]}"


def _text(lines: list[bytes]) -> str:
    return b"".join(lines).decode("utf-8", errors="replace").rstrip("\n")


class JsonArrayFile:
    """A JSON array of samples, decoded one element at a time with the stdlib decoder (the file is
    never read whole). A syntax error ends the file: nothing after it can be found reliably."""

    CHUNK = 1 << 16

    def __init__(self, path: str):
        self.path = path

    def units(self) -> list[int]:
        return [0]

    def records(self, unit: int, start: tuple[int, int] | None):
        offset, index = start or (0, 0)
        with open(self.path, "rb") as f:
            reader = _JsonStream(f, offset, self.CHUNK)
            if start is None and reader.next_char() != "[":
                raise SampleError("malformed", f"{self.path}: a .json data file must hold an array of "
                                               f"samples (use .jsonl for one sample a line)")
            after_element = start is not None
            while True:
                char = reader.next_char()
                if char == "]":
                    return
                if after_element:
                    if char != ",":
                        raise SampleError("malformed", f"{self.path}: expected ',' or ']' after "
                                                       f"element {index - 1}, got {char or 'end of file'!r}")
                    char = reader.next_char()
                if not char:
                    raise SampleError("malformed", f"{self.path}: the array is not closed")
                reader.pos -= 1  # the element starts at that character
                position = (reader.offset(), index)
                value = reader.decode(f"{self.path}: element {index}")
                index += 1
                after_element = True
                yield position, (reader.offset(), index), value

    def read(self, position: tuple[int, int]):
        with open(self.path, "rb") as f:
            return _JsonStream(f, position[0], self.CHUNK).decode(f"{self.path}: element {position[1]}")

    def describe(self, position: tuple[int, int]) -> str:
        return f"{self.path}[{position[1]}]"


class _JsonStream:
    """Characters of a UTF-8 file from a byte offset, with the byte offset of the read position."""

    def __init__(self, f, offset: int, chunk: int):
        self.f, self.chunk = f, chunk
        f.seek(offset)
        self.base = offset  # byte offset of buf[0]
        self.buf, self.pos, self.eof = "", 0, False
        self.utf8 = codecs.getincrementaldecoder("utf-8")()

    def _fill(self) -> bool:
        if self.eof:
            return False
        # drop what was read, so that memory is bounded by the largest element
        self.base += len(self.buf[:self.pos].encode())
        self.buf, self.pos = self.buf[self.pos:], 0
        data = self.f.read(self.chunk)
        self.eof = not data
        self.buf += self.utf8.decode(data, final=self.eof)
        return True

    def offset(self) -> int:
        return self.base + len(self.buf[:self.pos].encode())

    def next_char(self) -> str:
        """The next non-space character ("" at the end of the file), consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.buf):
                self.pos += 1
                return self.buf[self.pos - 1]
            if not self._fill():
                return ""

    def decode(self, where: str):
        """The JSON value at the read position, reading on until it is complete."""
        while True:
            try:
                value, end = json.JSONDecoder().raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self._fill():
                    continue
                raise SampleError("malformed", f"{where}: invalid JSON ({e})") from None
            # a number may continue in the next chunk
            if end == len(self.buf) and self._fill():
                continue
            self.pos = end
            return value


class ParquetFile:
    """Rows of a Parquet file, streamed one row group at a time (pyarrow's iter_batches); only the
    ``columns`` the sample kind uses are decoded."""

    BATCH_ROWS = 256

    def __init__(self, path: str, columns: tuple[str, ...]):
        self.path, self.wanted = path, columns
        self._cached: tuple[int, list[dict]] | None = None  # the last row group read() decoded

    def _open(self):
        pq = import_parquet(self.path)
        try:
            f = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError ... for a file it cannot read
            raise SampleError("corrupt_file", f"{self.path}: cannot read Parquet ({e})") from None
        columns = [c for c in self.wanted if c in f.schema_arrow.names]
        return f, columns

    def units(self) -> list[int]:
        f, _ = self._open()
        return list(range(f.num_row_groups))

    def records(self, group: int, start: tuple[int, int] | None):
        row = start[1] if start else 0
        f, columns = self._open()
        first = 0  # index in the row group of the batch's first row
        try:
            for batch in f.iter_batches(batch_size=self.BATCH_ROWS, row_groups=[group], columns=columns):
                rows = batch.to_pylist()
                for i in range(max(0, row - first), len(rows)):
                    yield (group, first + i), (group, first + i + 1), rows[i]
                first += len(rows)
        except Exception as e:  # a corrupt page: the rest of the row group is lost
            raise SampleError("corrupt_file", f"{self.path}: row group {group} from row {first}: "
                                              f"cannot read Parquet ({e})") from None

    def read(self, position: tuple[int, int]) -> dict:
        group, row = position
        if self._cached is None or self._cached[0] != group:
            f, columns = self._open()
            self._cached = (group, f.read_row_group(group, columns=columns).to_pylist())
        return self._cached[1][row]

    def describe(self, position: tuple[int, int]) -> str:
        return f"{self.path}:row group {position[0]} row {position[1]}"

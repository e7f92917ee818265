"""Input corpora: plain-text files (one document per file), JSONL (one document per line, text
in a chosen field), Parquet (one document per row of a text column), and directories of them
(walked recursively in sorted order, hidden files skipped). A `.gz` suffix is read through gzip.

Work is cut into units for the worker processes: a text file, a byte range of a JSONL file
(CHUNK_BYTES, a line belongs to the range it starts in), or a Parquet row group. Units and
their documents come in a fixed order, so document indices do not depend on the worker count.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sessa_scale.errors import UserError

CHUNK_BYTES = 4 * 2**20
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Unit:
    """A piece of input: kind is text | jsonl | parquet; start/end are a byte range (jsonl) or a
    row group (parquet, start = its index); size is the input bytes it covers (for progress)."""

    path: str
    kind: str
    start: int = 0
    end: int = -1
    size: int = 0


@dataclass
class Document:
    """One document: its text (None when it was skipped as invalid) and where it came from."""

    text: str | None
    raw: bytes
    where: str


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    return [path]


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{path}: reading Parquet needs pyarrow: pip install 'sessa-scale[parquet]' (or pip install pyarrow)"
        ) from None
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for bad files
        raise UserError(f"{path}: not a readable Parquet file: {exc}") from None


def expand_inputs(inputs: list[str]) -> list[Unit]:
    """The work units of every input path; missing paths are reported together."""
    missing = [p for p in inputs if not Path(p).exists()]
    if missing:
        raise UserError(f"input(s) not found: {', '.join(missing)}; pass text/JSONL/Parquet files or directories")
    units: list[Unit] = []
    for item in inputs:
        files = _files(Path(item))
        if not files:
            raise UserError(f"input directory {item} holds no files")
        for f in files:
            kind, size = _kind(f), f.stat().st_size
            if kind == "parquet":
                meta = _parquet_file(str(f)).metadata
                for g in range(meta.num_row_groups):
                    units.append(Unit(str(f), kind, g, g + 1, size // max(1, meta.num_row_groups)))
            elif kind == "jsonl" and f.suffix != ".gz" and size > CHUNK_BYTES:
                units += [Unit(str(f), kind, s, min(s + CHUNK_BYTES, size), min(CHUNK_BYTES, size - s)) for s in range(0, size, CHUNK_BYTES)]
            else:
                units.append(Unit(str(f), kind, 0, -1, size))
    return units


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, where: str, on_invalid: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if on_invalid == "skip":
            return None
        raise UserError(
            f"{where}: invalid UTF-8 at byte {exc.start} ({exc.reason}); fix or re-encode the input, or pass "
            "--on-invalid skip to skip such documents (they are counted in the manifest)"
        ) from None


def _jsonl_lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(line number or byte offset label, line) of the lines that start inside the unit."""
    with _open(unit.path) as fh:
        if unit.end < 0:
            yield from enumerate(fh, 1)
            return
        pos = unit.start
        if pos > 0:
            fh.seek(pos - 1)
            pos += len(fh.readline()) - 1  # finish the line that started before the range
        while pos < unit.end:
            line = fh.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def read_documents(unit: Unit, text_field: str, on_invalid: str) -> Iterator[Document]:
    """The documents of a unit, in order. Invalid UTF-8 raises UserError (on_invalid=error) or
    yields a Document with text None (skip)."""
    if unit.kind == "text":
        with _open(unit.path) as fh:
            raw = fh.read()
        yield Document(_decode(raw, unit.path, on_invalid), raw, unit.path)
    elif unit.kind == "jsonl":
        label = "line" if unit.end < 0 else "byte"
        for n, line in _jsonl_lines(unit):
            if not line.strip():
                continue
            where = f"{unit.path}:{label} {n}"
            text = _decode(line, where, on_invalid)
            if text is None:
                yield Document(None, line, where)
                continue
            try:
                record = json.loads(text)
            except ValueError as exc:
                raise UserError(f"{where}: not valid JSON ({exc}); each line of a JSONL file must be one JSON object") from None
            value = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                keys = ", ".join(sorted(record)) if isinstance(record, dict) else "none (not an object)"
                raise UserError(
                    f"{where}: no string field {text_field!r} (fields: {keys}); choose the text field with --text-field"
                )
            yield _checked(value, where, on_invalid)
    else:
        table = _parquet_file(unit.path).read_row_group(unit.start)
        if text_field not in table.column_names:
            raise UserError(
                f"{unit.path}: no column {text_field!r} (columns: {', '.join(table.column_names)}); choose it with --text-field"
            )
        for i, value in enumerate(table.column(text_field).to_pylist()):
            where = f"{unit.path}:row group {unit.start} row {i}"
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}: column {text_field!r} holds {type(value).__name__}, not text")
            yield _checked(value or "", where, on_invalid)


def _checked(text: str, where: str, on_invalid: str) -> Document:
    """A decoded string as a Document; lone surrogates (from JSON escapes) count as invalid UTF-8."""
    try:
        return Document(text, text.encode("utf-8"), where)
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
        return Document(_decode(raw, where, on_invalid), raw, where)

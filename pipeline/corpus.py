"""Read a corpus into documents (pipeline stage 1, DESIGN §3).

Accepted inputs (see docs/corpus.md):

* ``*.jsonl`` / ``*.ndjson`` — one JSON object per line; blank lines skipped.
* ``*.parquet`` — read with pyarrow, batch by batch.
* a folder of ``*.txt`` / ``*.md`` files (recursive; hidden entries skipped);
  ``doc_id`` is the POSIX path relative to the folder. A single ``.txt``/``.md``
  file is read as a one-document corpus.
* a folder written by ``datasets`` ``save_to_disk`` (``Dataset`` or
  ``DatasetDict``), read with ``datasets.load_from_disk`` — local only.

Records without an id get a stable one, ``"<file name>:<n>"`` where ``n`` is
the 1-based line number (jsonl) or 1-based row number (parquet, datasets).
Fields other than the text and id go into ``meta`` when they are JSON-able and
small (≤ ``META_MAX_CHARS`` characters as JSON); others are dropped.
Whitespace-only documents are skipped with a :class:`CorpusWarning` giving the
count; text holding NUL characters (a binary file, UTF-16 text) is a :class:`CorpusError`.
The result is sorted by ``doc_id`` (plain string order).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["Document", "CorpusError", "CorpusWarning", "read_corpus", "META_MAX_CHARS"]

META_MAX_CHARS = 1024
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_BATCH_ROWS = 4096


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    meta: dict = field(default_factory=dict)  # small, JSON-able


class CorpusError(ValueError):
    """A corpus that cannot be read; the message says where and why."""


class CorpusWarning(UserWarning):
    """Something skipped while reading a corpus (e.g. empty documents)."""


# A raw record before validation: (doc_id, text, meta, where) — ``where`` is a
# human-readable location ("a.jsonl line 3") used in error messages.
_Record = tuple[str, str, dict, str]


def read_corpus(path: str | Path, text_field: str = "text", id_field: str = "id") -> list[Document]:
    """Read ``path`` (jsonl, parquet, text folder or datasets folder) into documents
    sorted by ``doc_id``. Raises :class:`CorpusError` with a precise message on
    any problem."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus path not found: {p}")
    if p.is_dir():
        if _is_datasets_dir(p):
            records = _read_datasets(p, text_field, id_field)
        else:
            records = _read_text_dir(p)
    else:
        suffix = p.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            records = _read_jsonl(p, text_field, id_field)
        elif suffix in PARQUET_SUFFIXES:
            records = _read_parquet(p, text_field, id_field)
        elif suffix in TEXT_SUFFIXES:
            records = [(p.name, _decode_file(p), {}, str(p))]
        else:
            raise CorpusError(
                f"unknown corpus format {suffix or '(no suffix)'!r} for {p}: expected a "
                ".jsonl or .parquet file, a folder of .txt/.md files, or a folder "
                "saved with datasets' save_to_disk"
            )
    return _finish(records, p)


# ----------------------------------------------------------------- helpers

def _finish(records: Iterable[_Record], p: Path) -> list[Document]:
    seen: dict[str, str] = {}
    docs: list[Document] = []
    n_empty = 0
    for doc_id, text, meta, where in records:
        if doc_id in seen:
            raise CorpusError(f"duplicate doc_id {doc_id!r} in {p}: {seen[doc_id]} and {where}")
        seen[doc_id] = where
        _check_not_binary(text, where)
        if not text.strip():
            n_empty += 1
            continue
        docs.append(Document(doc_id, text, meta))
    if not docs:
        extra = f" ({n_empty} empty document(s) skipped)" if n_empty else ""
        raise CorpusError(f"no documents found in {p}{extra}")
    if n_empty:
        warnings.warn(f"skipped {n_empty} empty document(s) in {p}", CorpusWarning, stacklevel=3)
    docs.sort(key=lambda d: d.doc_id)
    return docs


def _check_not_binary(text: str, where: str) -> None:
    """Refuse text holding NUL characters: a binary file, or UTF-16/32 text (valid UTF-8 when ASCII)."""
    nul = text.find("\x00")
    if nul >= 0:
        raise CorpusError(f"{where}: NUL character at text offset {nul}: this looks like a binary file or "
                          "UTF-16/UTF-32 text; convert it to UTF-8 text (or remove the document)")


def _utf8_error(name: Path | str, offset: int, e: UnicodeDecodeError) -> CorpusError:
    bad = e.object[e.start:e.start + 4]
    return CorpusError(
        f"{name}: not valid UTF-8 at byte offset {offset} (bytes {bad!r}); "
        "re-encode the file as UTF-8"
    )


def _decode_file(p: Path, display: str | None = None) -> str:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(display or p, e.start, e) from None
    return text[1:] if text.startswith("\ufeff") else text


def _small_meta(row: dict, skip: tuple[str, ...]) -> dict:
    meta = {}
    for k, v in row.items():
        if k in skip:
            continue
        try:
            enc = json.dumps(v, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):
            continue
        if len(enc) <= META_MAX_CHARS:
            meta[str(k)] = v
    return meta


def _record(row: dict, text_field: str, id_field: str, auto_id: str, where: str) -> _Record:
    if text_field not in row:
        fields = ", ".join(map(str, row)) or "none"
        raise CorpusError(f"{where}: no {text_field!r} field (fields: {fields})")
    text = row[text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {text_field!r} is not a string (got {type(text).__name__})")
    raw_id = row.get(id_field)
    if raw_id is None:
        doc_id = auto_id
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        doc_id = str(raw_id)
        if not doc_id:
            raise CorpusError(f"{where}: field {id_field!r} is empty")
    else:
        raise CorpusError(f"{where}: field {id_field!r} must be a string or an integer (got {type(raw_id).__name__})")
    return doc_id, text, _small_meta(row, (text_field, id_field)), where


def _read_jsonl(p: Path, text_field: str, id_field: str) -> Iterator[_Record]:
    offset = 0
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(f"{p} line {lineno}", offset + e.start, e) from None
            offset += len(raw)
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            where = f"{p} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield _record(row, text_field, id_field, f"{p.name}:{lineno}", where)


def _check_columns(names: list[str], text_field: str, where: str) -> None:
    if text_field not in names:
        raise CorpusError(f"{where}: no {text_field!r} column (columns: {', '.join(names) or 'none'})")


def _read_parquet(p: Path, text_field: str, id_field: str) -> Iterator[_Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on bad files
        raise CorpusError(f"{p}: cannot read as parquet ({e})") from None
    _check_columns(pf.schema_arrow.names, text_field, str(p))
    rowno = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            rowno += 1
            yield _record(row, text_field, id_field, f"{p.name}:{rowno}", f"{p} row {rowno}")


def _is_datasets_dir(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def _read_datasets(p: Path, text_field: str, id_field: str) -> Iterator[_Record]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise CorpusError(f"{p} looks like a datasets folder but `datasets` is not installed") from e
    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as e:
        raise CorpusError(f"{p}: cannot load with datasets.load_from_disk ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = [(f"{p.name}/{name}", loaded[name]) for name in sorted(loaded)]
    else:
        splits = [(p.name, loaded)]
    for label, ds in splits:
        _check_columns(list(ds.column_names), text_field, f"{p} ({label})")
        rowno = 0
        for batch in ds.iter(batch_size=_BATCH_ROWS):
            cols = list(batch)
            n = len(batch[cols[0]]) if cols else 0
            for i in range(n):
                rowno += 1
                row = {c: batch[c][i] for c in cols}
                yield _record(row, text_field, id_field, f"{label}:{rowno}", f"{p} ({label}) row {rowno}")


def _read_text_dir(p: Path) -> list[_Record]:
    files: list[Path] = []
    others: list[str] = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        if f.suffix.lower() in TEXT_SUFFIXES:
            files.append(f)
        elif f.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES:
            others.append(rel.as_posix())
    if not files:
        hint = ""
        if others:
            hint = f"; it holds {', '.join(others[:3])}{'...' if len(others) > 3 else ''}: pass that file itself"
        raise CorpusError(f"no documents found in {p} (no .txt or .md files{hint})")
    out = []
    for f in files:
        rel = f.relative_to(p).as_posix()
        out.append((rel, _decode_file(f, display=f), {}, str(f)))
    return out


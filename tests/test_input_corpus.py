"""Issue 13 item 10 (build-time input): odd documents build or fail clearly, before any work."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model_dir
from kvfuse.loader.store import Store, read_current
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.pipeline.corpus import CorpusError, CorpusWarning
from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.model import load_model

ODD = ["Emoji 👩‍👩‍👧‍👦 🇫🇷 the red cat", "東京タワーは一九五八年に完成しました。", "مرحبا بالعالم. שלום עולם \u202e!",
       "the capital of france is paris ."]


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory, "llama")))


def test_emoji_cjk_rtl_and_empty_documents_build_and_serve(lm, tmp_path):
    corpus = _jsonl(tmp_path / "c.jsonl", ODD + ["", "  \n "])
    with pytest.warns(CorpusWarning, match="skipped 2 empty"):
        report = build_cache(corpus, tmp_path / "cache", lm, BuildConfig(chunk_tokens=16, enrich=False, progress=False))
    store = Store.open(tmp_path / "cache")
    assert {r.doc_id for r in store.records()} == {"d0", "d1", "d2", "d3"} and report.chunks >= 4
    for r in store.records():
        assert r.n_tokens > 0 and store.read(r.chunk_id).tokens.numel() == r.n_tokens
    a = FusionEngine(tmp_path / "cache", lm).ask("東京タワー", top_k=2, max_new_tokens=2)
    assert store.record(a.chunk_ids[0]).doc_id == "d1"


def test_binary_document_fails_before_any_work(lm, tmp_path):
    cache = tmp_path / "cache"
    build_cache(_jsonl(tmp_path / "ok.jsonl", ODD), cache, lm, BuildConfig(chunk_tokens=16, enrich=False, progress=False))
    before = read_current(cache)
    bad = _jsonl(tmp_path / "bad.jsonl", ODD + ["PK\u0003\u0004\u0000\u0000zip"])
    with pytest.raises(CorpusError, match=r"bad\.jsonl line 5: NUL character"):
        build_cache(bad, cache, lm, BuildConfig(chunk_tokens=16, enrich=False, progress=False))
    assert read_current(cache) == before

"""Incremental refresh: only new/changed chunks and those whose neighbour set changed are recomputed."""

import dataclasses
import json
import random

import pytest
import torch
from conftest import tiny_model_dir

from kvfuse.loader.store import Store
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.runtime.model import load_model

WORDS = "the city is the capital of the country and the river is red".split()


def write_docs(path, docs: dict[str, str]):
    with open(path, "w") as f:
        for doc_id, text in docs.items():
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return path


def make_docs(n=6, words=48, seed=0):
    rng = random.Random(seed)
    return {f"d{i}": " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory)))


def signature(store: Store) -> dict[str, tuple]:
    """chunk_id -> (text, neighbour texts): what determines a chunk's bytes, told by text, not ids."""
    return {r.chunk_id: (r.text, tuple(store.record(n).text for n in r.neighbours)) for r in store.records()}


def build_then_change(tmp_path, lm, cfg, change):
    """Build make_docs(), apply change(docs), refresh; returns (old store, new store, refresh report)."""
    docs = make_docs()
    build_cache(write_docs(tmp_path / "c.jsonl", docs), tmp_path / "cache", lm, cfg)
    old = Store.open(tmp_path / "cache")
    change(docs)
    report = build_cache(write_docs(tmp_path / "c.jsonl", docs), tmp_path / "cache", lm, cfg)
    return old, Store.open(tmp_path / "cache"), report


def assert_reused_bytes(old: Store, new: Store, ids) -> None:
    for cid in ids:
        a, b = old.record(cid), new.record(cid)
        assert (a.shard, a.checksum) == (b.shard, b.checksum)  # by reference: same shard, no copy
        assert torch.equal(old.read(cid).kv.view(torch.uint8), new.read(cid).kv.view(torch.uint8))


@pytest.mark.parametrize("enrich", [False, True])
def test_editing_one_document_recomputes_exactly_the_affected_chunks(tmp_path, lm, enrich):
    cfg = BuildConfig(chunk_tokens=16, progress=False, enrich=enrich, neighbour_tokens=40)

    def edit(docs):  # the first chunk(s) of one document
        docs["d3"] = docs["d3"].replace("the", "a", 2)

    old, new, report = build_then_change(tmp_path, lm, cfg, edit)

    before = set(signature(old).values())
    affected = [cid for cid, sig in signature(new).items() if sig not in before]
    edited = [r for r in new.records() if r.doc_id == "d3" and r.text not in {o.text for o in old.records()}]
    assert 1 <= len(edited) < len([r for r in new.records() if r.doc_id == "d3"])
    assert report.computed == len(affected) and report.reused == report.chunks - len(affected)
    if not enrich:
        assert len(affected) == len(edited)
    else:
        assert report.embedded == len(edited)  # unchanged contents are never embedded again
    assert_reused_bytes(old, new, [cid for cid in signature(new) if cid not in affected])


def test_deleting_a_document_drops_its_chunks(tmp_path, lm):
    cfg = BuildConfig(chunk_tokens=16, progress=False, neighbour_tokens=40)
    old, new, report = build_then_change(tmp_path, lm, cfg, lambda docs: docs.pop("d2"))
    assert "d2" not in {r.doc_id for r in new.records()}
    assert report.chunks == len(old.records()) - len([r for r in old.records() if r.doc_id == "d2"])
    before = set(signature(old).values())
    changed = [cid for cid, sig in signature(new).items() if sig not in before]  # lost a neighbour in d2
    assert report.computed == len(changed) and report.embedded == 0
    assert_reused_bytes(old, new, [cid for cid in signature(new) if cid not in changed])


def test_reader_keeps_its_release_while_the_next_is_published(tmp_path, lm):
    cfg = BuildConfig(chunk_tokens=16, progress=False, neighbour_tokens=40)
    docs = make_docs()
    build_cache(write_docs(tmp_path / "c.jsonl", docs), tmp_path / "cache", lm, cfg)
    reader = Store.open(tmp_path / "cache")
    before = {r.chunk_id: reader.read(r.chunk_id).kv.clone() for r in reader.records()}
    docs["d0"] = "the red river is the capital"
    docs["d9"] = "a new city of the country"
    report = build_cache(write_docs(tmp_path / "c.jsonl", docs), tmp_path / "cache", lm, cfg)
    assert report.computed > 0 and Store.open(tmp_path / "cache").release == report.release != reader.release
    assert {r.chunk_id for r in reader.records()} == set(before)
    for cid, kv in before.items():
        assert torch.equal(reader.read(cid).kv, kv)  # verified against R's checksums


def test_same_corpus_twice_reuses_everything(tmp_path, lm):
    cfg = BuildConfig(chunk_tokens=16, progress=False, neighbour_tokens=40)
    path = write_docs(tmp_path / "c.jsonl", make_docs())
    first = build_cache(path, tmp_path / "cache", lm, cfg)
    ids = [r.chunk_id for r in Store.open(tmp_path / "cache").records()]
    again = build_cache(path, tmp_path / "cache", lm, cfg)
    assert again.computed == again.embedded == 0 and again.reused == first.chunks
    assert [r.chunk_id for r in Store.open(tmp_path / "cache").records()] == ids


def test_fp8_refresh_of_enriched_store_reencodes_and_matches_fresh_fp8_build(tmp_path, lm):
    """--kv-dtype fp8 onto a model-dtype release: every chunk (neighbour-enriched ids too) is
    re-encoded from the stored KV, not prefilled, byte for byte what a fresh fp8 build writes;
    a second fp8 refresh reuses them all."""
    docs = write_docs(tmp_path / "c.jsonl", make_docs())
    model = BuildConfig(chunk_tokens=16, progress=False, enrich=True, neighbour_tokens=40)
    fp8 = BuildConfig(chunk_tokens=16, progress=False, enrich=True, neighbour_tokens=40, kv_dtype="fp8")
    build_cache(docs, tmp_path / "cache", lm, model)
    old = Store.open(tmp_path / "cache")
    report = build_cache(docs, tmp_path / "cache", lm, fp8)
    build_cache(docs, tmp_path / "fresh", lm, fp8)
    new, fresh = Store.open(tmp_path / "cache"), Store.open(tmp_path / "fresh")
    assert any(r.neighbours for r in new.records())
    assert report.computed == 0 and report.transcoded == len(new) - 1
    ids = {r.chunk_id: r.checksum for r in new.records(include_prefix=True)}
    assert ids == {r.chunk_id: r.checksum for r in fresh.records(include_prefix=True)}
    assert not set(ids) & {r.chunk_id for r in old.records(include_prefix=True)}
    assert new.manifest["stats"]["transcoded"] == report.transcoded
    again = build_cache(docs, tmp_path / "cache", lm, fp8)
    assert again.computed == again.transcoded == 0 and again.reused == again.chunks
    # int8 onto the fp8 release: re-encoded from the newest model-dtype release, not prefilled
    int8 = build_cache(docs, tmp_path / "cache", lm, dataclasses.replace(fp8, kv_dtype="int8"))
    assert int8.computed == 0 and int8.transcoded == len(new) - 1
    # back to the model's dtype: the old release's chunks are found again by id (nothing recomputed)
    back = build_cache(docs, tmp_path / "cache", lm, model)
    assert back.computed == 0

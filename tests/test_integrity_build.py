"""Issue 13, store half, on builds of a tiny random model: damaged shards are repaired (exactly the
bad chunks), leftover shards are verified (never re-checksummed), a damaged CURRENT/manifest/index
makes the rebuild fall back to a release that verifies, identical text keeps every document, and a
corpus whose KV would be huge is refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model_dir
from test_refresh import make_docs, write_docs

from kvfuse.cli.main import main
from kvfuse.loader import format as fmt
from kvfuse.loader.errors import CorruptShardError
from kvfuse.loader.manifest import manifest_path, read_current, read_manifest, write_current
from kvfuse.loader.store import Store, verify_release
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.runtime.model import load_model

CFG = BuildConfig(chunk_tokens=16, progress=False, enrich=False, shard_bytes=1)  # a shard per chunk


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def clean(tmp_path_factory, lm):
    """A clean 4-document build: (corpus, cache)."""
    tmp = tmp_path_factory.mktemp("clean")
    corpus = write_docs(tmp / "c.jsonl", make_docs(n=4, words=30))
    build_cache(corpus, tmp / "cache", lm, CFG)
    return corpus, tmp / "cache"


def kv_bytes(cache: Path) -> dict[str, bytes]:
    with Store.open(cache, lease=False) as store:
        return {r.chunk_id: bytes(fmt.tensor_bytes(store.read(r.chunk_id).kv)) for r in store.records(include_prefix=True)}


def shard_file(cache: Path, chunk_id: str) -> Path:
    with Store.open(cache, lease=False) as store:
        return cache / fmt.SHARDS_DIR / f"{store.record(chunk_id).shard}{fmt.SHARD_SUFFIX}"


def a_chunk(cache: Path, i: int = 1) -> str:
    with Store.open(cache, lease=False) as store:
        return store.records()[i].chunk_id


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_a_damaged_shard_is_recomputed_exactly_and_the_release_equals_a_clean_build(tmp_path, model_dir, clean,
                                                                                     damage):
    corpus, ref = clean
    cache = tmp_path / "cache"
    shutil.copytree(ref, cache)
    cid = a_chunk(cache)
    path = shard_file(cache, cid)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x10  # in the KV data: size and header unchanged
        path.write_bytes(bytes(data))
    report = verify_release(cache)
    assert report.bad_chunks == {cid}
    if damage == "flip":  # a flip in the data passes the cheap check: --repair (or a failed read) finds it
        with pytest.raises(CorruptShardError, match="--repair"):
            Store.open(cache).read(cid)  # the failed read is noted for the next build
    out = CliRunner().invoke(main, ["build-cache", str(corpus), "--cache", str(cache), "--model", str(model_dir),
                                    "--no-enrich", "--in-process",
                                    "--chunk-tokens", "16", "--shard-mb", "1"] + (["--repair"] if damage == "flip" else []))
    assert out.exit_code == 0, out.output
    assert "1 computed" in out.output, out.output
    assert verify_release(cache).ok
    assert kv_bytes(cache) == kv_bytes(ref)


def test_repair_recomputes_exactly_the_bad_chunks_of_three_shards(tmp_path, lm, clean):
    corpus, ref = clean
    cache = tmp_path / "cache"
    shutil.copytree(ref, cache)
    bad = {a_chunk(cache, i) for i in (0, 2, 4)}
    for cid in bad:
        path = shard_file(cache, cid)
        data = bytearray(path.read_bytes())
        data[-2] ^= 0x01
        path.write_bytes(bytes(data))
    assert verify_release(cache).bad_chunks == bad
    report = build_cache(corpus, cache, lm, BuildConfig(**{**CFG.__dict__, "verify": True}))
    assert report.computed == 3 and set(report.repaired) == bad
    assert verify_release(cache).ok and kv_bytes(cache) == kv_bytes(ref)


def test_a_zeroed_leftover_shard_is_never_published_as_good(tmp_path, lm):
    """Item 1a: chunks found in shards outside the current release are verified against the sums
    their writer recorded, never re-checksummed from the bytes now on disk."""
    docs = make_docs(n=3, words=30)
    cache = tmp_path / "cache"
    r1 = build_cache(write_docs(tmp_path / "c.jsonl", docs), cache, lm, CFG).release
    docs["d9"] = "the red river is the capital of the city"
    build_cache(write_docs(tmp_path / "c.jsonl", docs), cache, lm, CFG)
    new = {r.chunk_id for r in Store.open(cache).records() if r.doc_id == "d9"}
    paths = {shard_file(cache, cid) for cid in new}
    for release in Path(cache / fmt.RELEASES_DIR).glob("r0002*"):  # as if the build was killed before its
        release.unlink()                                            # publish: d9's shard is a leftover
    write_current(cache, r1)
    for path in paths:  # zero the KV in place: size and header unchanged
        data = bytearray(path.read_bytes())
        head = 8 + int.from_bytes(data[:8], "little")
        data[head:] = bytes(len(data) - head)
        path.write_bytes(bytes(data))
    report = build_cache(write_docs(tmp_path / "c.jsonl", docs), cache, lm, CFG)
    assert report.computed == len(new), "zeroed KV was carried forward"
    assert verify_release(cache).ok
    with Store.open(cache) as store:
        for cid in new:
            assert store.read(cid).kv.abs().sum() > 0


def damage_current_garbage(cache, r2):
    (cache / fmt.CURRENT_FILE).write_bytes(b"\x00\x17garbage\n")


def damage_current_missing(cache, r2):
    (cache / fmt.CURRENT_FILE).write_text("r0099-20990101T000000\n")


def damage_current_outside(cache, r2):
    (cache / fmt.CURRENT_FILE).write_text("../../etc/passwd\n")


def damage_manifest_flip(cache, r2):
    p = manifest_path(cache, r2)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x04
    p.write_bytes(bytes(data))


def damage_index_flip(cache, r2):
    p = cache / read_manifest(cache, r2)["index"]
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x01
    p.write_bytes(bytes(data))


def damage_manifest_deleted(cache, r2):
    manifest_path(cache, r2).unlink()


@pytest.mark.parametrize("damage", [damage_current_garbage, damage_current_missing, damage_current_outside,
                                    damage_manifest_flip, damage_index_flip, damage_manifest_deleted])
def test_a_rebuild_after_damaged_metadata_falls_back_to_a_release_that_verifies(tmp_path, lm, damage):
    docs = make_docs(n=3, words=30)
    cache = tmp_path / "cache"
    r1 = build_cache(write_docs(tmp_path / "c.jsonl", docs), cache, lm, CFG).release
    docs["d9"] = "the red river is the capital of the city"
    r2 = build_cache(write_docs(tmp_path / "c.jsonl", docs), cache, lm, CFG).release
    want = kv_bytes(cache)
    damage(cache, r2)
    report = build_cache(write_docs(tmp_path / "c.jsonl", docs), cache, lm, CFG)
    notes = " ".join(report.notes)
    assert f"falling back to release {r1}" in notes or f"falling back to release {r2}" in notes, report.notes
    assert report.computed <= 1  # only d9's chunk when r1 is the fallback; r1's chunks verified and reused
    assert read_current(cache) == report.release and verify_release(cache).ok
    assert kv_bytes(cache) == want


def test_identical_text_keeps_every_document_and_shares_the_kv(tmp_path, lm):
    memo = "the key value is the secret number of the red house"
    docs = {"memo_a": memo, "memo_b": memo, "memo_c": " ".join([memo] * 4)}  # memo_c repeats a window
    cache = tmp_path / "cache"
    build_cache(write_docs(tmp_path / "c.jsonl", docs), cache, lm, BuildConfig(chunk_tokens=16, progress=False))
    out = CliRunner().invoke(main, ["inspect", str(cache), "--json"])
    stats = json.loads(out.output)
    assert stats["documents"] == 3
    store = Store.open(cache)
    assert store.manifest["stats"]["documents"] == 3
    rows = store.records()
    by_doc = {d: [r for r in rows if r.doc_id == d] for d in docs}
    assert [r.chunk_id for r in by_doc["memo_a"]] == [r.chunk_id for r in by_doc["memo_b"]]
    assert [r.chunk_no for r in by_doc["memo_c"]] == list(range(len(by_doc["memo_c"])))
    assert stats["distinct_chunks"] < stats["chunks"]  # dedupe on disk stays
    cid = by_doc["memo_a"][0].chunk_id
    assert {r.doc_id for r in store.rows_of(cid)} >= {"memo_a", "memo_b"}
    from kvfuse.runtime.engine import FusionEngine
    engine = FusionEngine(cache, lm)
    assert {r.doc_id for r in engine.records} == set(docs)
    a = engine.ask("what is the secret number", top_k=3, ratio=0.2, max_new_tokens=2)
    assert a.chunk_ids and all(c in store for c in a.chunk_ids)


def test_a_corpus_whose_kv_would_be_huge_is_refused_before_any_work(tmp_path, lm, model_dir):
    import random
    rng = random.Random(0)
    words = "the city is the capital of the country and the river is red".split()
    corpus = write_docs(tmp_path / "c.jsonl", {"big": " ".join(rng.choice(words) for _ in range(60000))})  # one line
    with pytest.raises(ValueError, match=r"--max-kv-gb") as e:
        build_cache(corpus, tmp_path / "cache", lm, BuildConfig(chunk_tokens=64, progress=False, max_kv_gb=0.01))
    assert "GiB of KV" in str(e.value)
    assert not (tmp_path / "cache" / fmt.CURRENT_FILE).exists()
    out = CliRunner().invoke(main, ["build-cache", str(corpus), "--cache", str(tmp_path / "cache"), "--in-process",
                                    "--model", str(model_dir), "--chunk-tokens", "64", "--max-kv-gb", "0.01"])
    assert out.exit_code != 0 and "--max-kv-gb" in str(out.exception)


def test_bad_corpus_lines_and_columns_are_named(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"text": "the dog",,}\n')
    out = CliRunner().invoke(main, ["build-cache", str(bad), "--cache", str(tmp_path / "c1"), "--in-process",
                                    "--model", str(model_dir)])
    assert out.exit_code != 0 and "bad.jsonl line 2" in str(out.exception) and "column" in str(out.exception)
    pq.write_table(pa.table({"body": ["the cat"]}), tmp_path / "bad.parquet")
    out = CliRunner().invoke(main, ["build-cache", str(tmp_path / "bad.parquet"), "--cache", str(tmp_path / "c2"),
                                    "--in-process", "--model", str(model_dir)])
    assert out.exit_code != 0 and "bad.parquet" in str(out.exception) and "'text' column" in str(out.exception)


def test_a_build_that_fills_the_disk_fails_clearly_and_keeps_the_previous_release(tmp_path, lm):
    import subprocess
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cache = mnt / "cache"
        docs = make_docs(n=2, words=30)
        first = build_cache(write_docs(tmp_path / "c.jsonl", docs), cache, lm, CFG).release
        docs.update(make_docs(n=60, words=30, seed=1) | {f"x{i}": t for i, t in enumerate(make_docs(60, 30, 2).values())})
        with pytest.raises(Exception) as e:  # OSError (no room for the new KV) or StoreError (mid-shard)
            build_cache(write_docs(tmp_path / "c.jsonl", docs), cache, lm, CFG)
        assert "space" in str(e.value).lower() and "rerun" in str(e.value), str(e.value)
        assert read_current(cache) == first and verify_release(cache).ok
        assert not list((cache / fmt.SHARDS_DIR).glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)])

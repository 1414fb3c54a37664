"""`kvfuse gc --keep N`: old releases and unreferenced shards/embeddings go, kept releases stay whole."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model_dir
from test_refresh import make_docs, write_docs

from kvfuse.loader import format as fmt
from kvfuse.loader.gc import collect
from kvfuse.loader.store import Store, list_releases
from kvfuse.loader.writer import ShardWriter
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.cli.main import main
from kvfuse.runtime.model import load_model


@pytest.fixture(scope="module")
def three_releases(tmp_path_factory):
    lm = load_model(str(tiny_model_dir(tmp_path_factory)))
    tmp = tmp_path_factory.mktemp("gc")
    cfg = BuildConfig(chunk_tokens=16, progress=False, neighbour_tokens=40, shard_bytes=1)  # a shard per chunk
    docs = make_docs()
    for i in range(3):
        docs[f"d{i}"] = f"the red city number {i} is the capital"
        build_cache(write_docs(tmp / "c.jsonl", docs), tmp / "cache", lm, cfg)
    return tmp / "cache"


def shards(cache):
    return {p.name.removesuffix(fmt.SHARD_SUFFIX) for p in (cache / fmt.SHARDS_DIR).glob(f"*{fmt.SHARD_SUFFIX}")}


def test_gc_keeps_the_newest_releases_whole_and_deletes_the_rest(three_releases, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(three_releases, cache)
    r1, r2, r3 = list_releases(cache)
    orphan = ShardWriter(cache, {"model_fingerprint": "x"})
    orphan.add("orphan", torch.zeros(1, 2, 1, 1, 1), torch.zeros(1), torch.zeros(2, 1))
    orphan.flush()  # a shard a killed build left behind
    all_before = shards(cache)
    used = lambda rel: {r.shard for r in Store.open(cache, rel).records(include_prefix=True)}

    dry = collect(cache, keep=2, dry_run=True, grace_s=0)
    assert dry.releases == [r1] and shards(cache) == all_before
    report = collect(cache, keep=2, grace_s=0)
    assert report.kept == [r2, r3] and report.releases == [r1] and list_releases(cache) == [r2, r3]
    assert shards(cache) == used(r2) | used(r3) and orphan.written[0].shard in report.shards
    assert len(report.shards) > 1 and report.bytes_freed > 0  # r1's own chunks went too
    for rel in (r2, r3):
        store = Store.open(cache, rel)
        for rec in store.records():
            store.read(rec.chunk_id)
    emb = {p.name for p in (cache / "embeddings").iterdir()}
    assert emb == set(Store.open(cache, r2).manifest["embeddings"]) | set(Store.open(cache, r3).manifest["embeddings"])

    out = CliRunner().invoke(main, ["gc", str(cache), "--keep", "1", "--grace", "0"])
    assert out.exit_code == 0, out.output
    assert list_releases(cache) == [r3] and shards(cache) == used(r3)
    assert CliRunner().invoke(main, ["gc", str(cache), "--keep", "0"]).exit_code != 0


# ---- issue 13 item 9: keep by publish history, grace period, reader leases ----------------------

from test_store import some_chunks, write_release  # noqa: E402

from kvfuse.loader.manifest import read_current, read_history  # noqa: E402
from kvfuse.loader.store import LEASES_DIR  # noqa: E402


def crashed_publish(cache, chunks, monkeypatch):
    """What a build killed just before the CURRENT swap leaves: shards, index and manifest of a
    release that was never current (tests/test_integrity.py does it with a real SIGKILL)."""
    import kvfuse.loader.writer as writer
    with monkeypatch.context() as m:
        m.setattr(writer, "write_current", lambda *a: None)
        m.setattr(writer, "append_history", lambda *a: None)
        release, _ = write_release(cache, chunks)
    return release


def test_gc_keeps_by_publish_history_not_by_the_files_a_crashed_publish_left(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    r1, _ = write_release(cache, some_chunks(2, seed0=0, prefix="a"))
    r2, _ = write_release(cache, some_chunks(2, seed0=10, prefix="b"))
    r3 = crashed_publish(cache, some_chunks(2, seed0=20, prefix="c"), monkeypatch)  # never current
    assert r3 not in [r for r, _ in read_history(cache)] and read_current(cache) == r2
    r4, _ = write_release(cache, some_chunks(2, seed0=30, prefix="d"))  # the rerun
    assert sorted(list_releases(cache)) == sorted({r1, r2, r3, r4})
    report = collect(cache, keep=2, grace_s=0)
    assert r2 in report.kept and r4 in report.kept  # r2 was current until the rerun: readers may hold it
    assert r3 in report.releases and r1 in report.releases
    for rec in Store.open(cache, r2).records(include_prefix=True):
        Store.open(cache, r2).read(rec.chunk_id)


def test_gc_never_collects_a_release_inside_the_grace_period(tmp_path):
    cache = tmp_path / "cache"
    r1, _ = write_release(cache, some_chunks(2, prefix="a"))
    r2, _ = write_release(cache, some_chunks(2, seed0=10, prefix="b"))
    report = collect(cache, keep=1)  # default grace: r1 was current a moment ago
    assert r1 in report.kept and report.releases == [] and "grace" in report.reasons[r1]
    assert collect(cache, keep=1, grace_s=0).releases == [r1]
    out = CliRunner().invoke(main, ["gc", str(cache), "--keep", "1", "--grace", "soon"])
    assert out.exit_code != 0


def test_gc_keeps_a_release_a_live_reader_holds_and_expires_stale_leases(tmp_path):
    cache = tmp_path / "cache"
    r1, _ = write_release(cache, some_chunks(2, prefix="a"))
    reader = Store.open(cache)  # registers a lease on r1
    r2, _ = write_release(cache, some_chunks(2, seed0=10, prefix="b"))
    report = collect(cache, keep=1, grace_s=0)
    assert r1 in report.kept and "reader" in report.reasons[r1]
    for rec in reader.records(include_prefix=True):
        reader.read(rec.chunk_id)  # still whole
    reader.close()
    # a lease of a dead process on this host is stale: removed, and the release goes
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = cache / LEASES_DIR / "dead.json"
    lease.write_text(json.dumps({"release": r1, "pid": int(dead.stdout), "host": socket.gethostname()}))
    assert collect(cache, keep=1, grace_s=0).releases == [r1]
    assert not lease.exists()


def test_gc_dry_run_works_on_a_read_only_cache(tmp_path):
    cache = tmp_path / "cache"
    write_release(cache, some_chunks(2, prefix="a"))
    write_release(cache, some_chunks(2, seed0=10, prefix="b"))
    os.chmod(cache, 0o555)
    try:
        if os.access(cache, os.W_OK):  # root ignores modes: use a read-only bind mount instead
            pytest.skip("running as root: covered by test_integrity's read-only mount test")
        report = collect(cache, keep=1, dry_run=True, grace_s=0)
        assert len(report.releases) == 1
    finally:
        os.chmod(cache, 0o755)
